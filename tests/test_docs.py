"""The documentation site builds strictly, and a broken reference fails it."""

import importlib.util
import os
import subprocess
import sys

import pytest
import yaml

from admmprune.configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", os.path.join(ROOT, "docs", "_hooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(config_file, site_dir):
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config_file), "-d", str(site_dir)],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_site_builds_strictly(tmp_path):
    result = _build(os.path.join(ROOT, "mkdocs.yml"), tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    for page in (
        "index.html",
        "concepts/index.html",
        "reference/config/index.html",
        "reference/cli/index.html",
        "api/core/admm/index.html",
        "results/index.html",
    ):
        assert (tmp_path / "site" / page).is_file(), page
    config_page = (tmp_path / "site" / "reference/config/index.html").read_text()
    assert 'id="admm.interval"' in config_page
    assert "admmprune.core.admm.admm" in (tmp_path / "site" / "api/core/admm/index.html").read_text()


# kind: (Markdown, what the warning names). Each is a WARNING, which --strict
# turns into a failed build, so one build can check them all.
BROKEN = {
    "page": ("[a missing page](missing.md)", "missing.md"),
    "anchor": ("[a missing section](#no-such-heading)", "no-such-heading"),
    "repository file": ("[a missing file](../admmprune/no_such_module.py)", "no_such_module.py"),
    "cross-reference": ("[a missing object][admmprune.no_such_function]", "admmprune.no_such_function"),
}


def _broken_site(tmp_path, markdown):
    """The real mkdocs.yml (strict, validation, hooks, mkdocstrings) over a
    one-page site (plus the generated references) with ``markdown`` on it."""
    with open(os.path.join(ROOT, "mkdocs.yml")) as f:
        config = yaml.safe_load(f)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text(f"# Home\n\n## A section\n\n{markdown}\n")
    config["docs_dir"] = str(docs)
    config["hooks"] = [os.path.join(ROOT, "docs", "_hooks.py")]
    config["nav"] = ["index.md", "reference/cli.md", "reference/config.md"]
    config.pop("extra_javascript")
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            python = plugin["mkdocstrings"]["handlers"]["python"]
            python["paths"] = [ROOT]
            python["options"]["extensions"] = [os.path.join(ROOT, "docs", "_hooks.py:RstToMarkdown")]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    return _build(tmp_path / "mkdocs.yml", tmp_path / "site")


def test_broken_links_anchors_files_and_cross_references_fail_the_build(tmp_path):
    result = _broken_site(tmp_path, "\n\n".join(markdown for markdown, _ in BROKEN.values()))
    assert result.returncode != 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    for kind, (_, named) in BROKEN.items():
        assert any(named in line for line in warnings), f"{kind}: no warning\n{result.stderr[-2000:]}"
    assert all(any(named in line for _, named in BROKEN.values()) for line in warnings), warnings  # nothing else


def test_a_missing_api_identifier_fails_the_build(tmp_path):
    result = _broken_site(tmp_path, "::: admmprune.no_such_module")
    assert result.returncode != 0, result.stderr[-2000:]
    assert "admmprune.no_such_module" in result.stderr, result.stderr[-2000:]


def _flatten(config, prefix=""):
    out = []
    for key, value in config.items():
        if hasattr(value, "items"):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def test_config_reference_lists_every_field_with_its_comment():
    hooks = _hooks()
    page = hooks._shipped_config_reference()
    fields = _flatten(default.get_config())
    assert len(fields) > 50
    for field in fields:
        assert f"### `{field}` {{#{field}}}" in page, field
    assert "Steps between the projections/dual updates" in page  # admm.interval's comment
    assert "- [`data.limit`](#data.limit): `1024`" in page  # what smoke overrides


def test_config_reference_refuses_an_undocumented_field():
    hooks = _hooks()
    source = (
        "def get_config():\n"
        "    c = ConfigDict()\n"
        "    c.data = ConfigDict()\n"
        "    # Documented.\n"
        "    c.data.name = 'mnist'\n"
        "\n"
        "    c.data.batch_size = 128\n"
        "    return c\n"
    )
    with pytest.raises(ValueError, match=r"data\.batch_size"):
        hooks.config_entries(source)
    entries = hooks.config_entries(source, require_comments=False)
    assert [(e.name, e.comment, e.section) for e in entries] == [
        ("data", "", True),
        ("data.name", "Documented.", False),
        ("data.batch_size", "", False),
    ]


def test_cli_reference_shows_every_option_of_every_command():
    from admmprune import analyze, export, oneshot, train

    page = _hooks()._shipped_cli_reference()
    for module in (train, analyze, export, oneshot):
        parser = module.build_parser()
        # Every flag the command defines (absl's own list, as parsing sees it)
        # is in the reference, with its help text.
        names = list(parser.flag_values())
        assert names, module.__name__
        for name in names:
            assert f"`--{name}`" in page, name
        for option in parser.options():
            assert option.help.split()[0] in page, option.name
            for flag in option.flags:
                assert f"`{flag}`" in page, flag
    assert "`--config.FIELD=VALUE`" in page and "`MODEL_DIR`" in page and "`PATH`" in page


def test_docstring_rst_becomes_markdown_with_checked_cross_references():
    convert = _hooks().rst_to_markdown
    text = (
        "Alternates\n\n.. math::\n   W &\\leftarrow W - g\\\\\n   U &\\leftarrow U + W\n\n"
        "keeps :math:`k` groups (:func:`project`, :class:`~admmprune.sparsity.Filter`,\n"
        ":attr:`Discovery.notes`, :func:`jax.jit`, :func:`n <admmprune.projections.num_kept>`). Like this::\n\n"
        "    project(x)\n"
    )
    assert convert(text) == (
        "Alternates\n\n$$\n\\begin{aligned}\nW &\\leftarrow W - g\\\\\nU &\\leftarrow U + W\n\\end{aligned}\n$$\n\n"
        "keeps $k$ groups ([`project()`][project], [`Filter`][admmprune.sparsity.Filter],\n"
        "`Discovery.notes`, `jax.jit()`, [`n`][admmprune.projections.num_kept]). Like this:\n\n"
        "    project(x)\n"
    )
