"""mkdocs hooks: the generated reference pages, and links to repository files.

- ``reference/config.md`` is generated from ``admmprune/configs/``: every field
  of ``default.py`` with its default and the comment right above its
  assignment (a field without one fails the build), then what the other
  shipped configs override.
- ``reference/cli.md`` is the ``--help`` of the three command lines and a
  table of their arguments (``build_parser()`` of ``admmprune.train``,
  ``.analyze``, ``.export``: an ``admmprune.app.cli.Parser`` of absl flags).
- ``RstToMarkdown``, a griffe extension (mkdocs.yml lists it), turns the
  reStructuredText of the docstrings into Markdown for the API reference:
  ``:math:`` and ``.. math::`` into MathJax, ``:func:`` and the other roles into
  cross-references (checked: an unknown ``admmprune`` target fails the build).
- A Markdown link from a page to a repository file outside ``docs/`` (as
  ``../admmprune/runtime/distributed.py``, which also works when the page is read on
  GitHub) becomes a link to that file in the repository; a link to a file
  that does not exist is a warning, so the strict build fails.

The generators are pure functions of source text or parsers, so that
``tests/test_docs.py`` can call them.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import logging
import os
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "admmprune", "configs")
CLI_MODULES = ("admmprune.train", "admmprune.analyze", "admmprune.export", "admmprune.oneshot")
BRANCH = "main"

log = logging.getLogger("mkdocs.hooks.admmprune")


# --- the configuration reference -------------------------------------------------


class ConfigEntry(NamedTuple):
    """One assignment ``c.<name> = ...`` of a config's ``get_config()``."""

    name: str  # dotted, without the leading "c."
    comment: str  # the comment lines right above it, joined with newlines ("" if none)
    section: bool  # a ``ConfigDict()`` (a section) rather than a field


def _dotted(node: ast.expr) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def config_entries(source: str, *, require_comments: bool = True) -> list[ConfigEntry]:
    """Every ``c.x.y = value`` of ``get_config()`` in ``source``, in order, with
    the ``#`` comment lines directly above it (no blank line in between).

    Raises:
        ValueError: if ``require_comments`` and a field (not a section) has no
            comment, naming every such field; or if there is no ``get_config``.
    """
    tree = ast.parse(source)
    lines = source.splitlines()
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_config"]
    if not funcs:
        raise ValueError("no get_config() in the config source")
    entries = []
    for node in ast.walk(funcs[0]):
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        parts = _dotted(node.targets[0])
        if parts is None or len(parts) < 2:
            continue
        comment = []
        i = node.lineno - 2  # the line above, 0-based
        while i >= 0 and lines[i].strip().startswith("#"):
            comment.append(lines[i].strip()[1:].strip())
            i -= 1
        call = node.value
        section = (
            isinstance(call, ast.Call) and getattr(call.func, "id", getattr(call.func, "attr", "")) == "ConfigDict"
        )
        entries.append((node.lineno, ConfigEntry(".".join(parts[1:]), "\n".join(reversed(comment)), section)))
    entries = [e for _, e in sorted(entries, key=lambda item: item[0])]
    if require_comments:
        missing = [e.name for e in entries if not e.section and not e.comment]
        if missing:
            raise ValueError("config fields without a comment line above their assignment: " + ", ".join(missing))
    return entries


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"section.field": value}`` for every field of a (nested) ConfigDict."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items") and hasattr(value, "get_type"):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _field_type(config: Any, name: str) -> str:
    *path, key = name.split(".")
    node = config
    for part in path:
        node = node[part]
    return node.get_type(key).__name__


_SPECIAL = re.compile(r"([\\*_\[\]<>|#])")


def _text(comment: str) -> str:
    """A comment as Markdown text: code spans kept, other markup characters escaped."""
    pieces = re.split(r"(`[^`]*`)", " ".join(comment.split("\n")))
    return "".join(p if p.startswith("`") else _SPECIAL.sub(r"\\\1", p) for p in pieces)


def _code(value: Any) -> str:
    text = repr(value)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def config_reference(default_source: str, default_config: Any, variants: dict[str, tuple[str, Any]]) -> str:
    """The Markdown of the configuration reference.

    Args:
        default_source: the text of ``default.py``.
        default_config: its ``get_config()``.
        variants: ``{name: (module docstring, get_config())}`` of the other
            shipped configs; each is listed with the fields it changes.

    Raises:
        ValueError: a field without a comment, or a field of ``default_config``
            that the source does not assign (or the reverse).
    """
    entries = config_entries(default_source)
    values = flatten(default_config)
    fields = [e.name for e in entries if not e.section]
    if set(fields) != set(values):
        raise ValueError(f"config source and get_config() disagree: {sorted(set(fields) ^ set(values))}")
    overrides = {
        name: {k: v for k, v in flatten(cfg).items() if values.get(k, object()) != v}
        for name, (_, cfg) in variants.items()
    }
    out = [
        "# Configuration",
        "",
        "Generated from [`admmprune/configs/default.py`](../../admmprune/configs/default.py) when the site",
        "is built: every field, its default, and the comment above it in that file.",
        "Any field can be set on the command line with `--config.FIELD=VALUE`",
        "(for instance `--config.admm.rho=0.01`), and a config file (`--config configs/X.py`",
        "or a shipped name such as `--config smoke`) imports the default and overrides a few;",
        "see [the command line](cli.md).",
        "",
    ]
    top = [e for e in entries if "." not in e.name and not e.section]
    if top:
        out += ["## Top level {#top-level}", ""]
    for entry in top + [e for e in entries if e not in top]:
        if entry.section:
            out += [f"## `{entry.name}` {{#{entry.name}}}", ""]
            if entry.comment:
                out += [_text(entry.comment), ""]
            continue
        value = values[entry.name]
        line = f"Default {_code(value)}"
        if value is None:
            line += f" (type `{_field_type(default_config, entry.name)}`)"
        changed = [f"`{name}`: {_code(o[entry.name])}" for name, o in overrides.items() if entry.name in o]
        if changed:
            line += "; " + ", ".join(changed)
        out += [f"### `{entry.name}` {{#{entry.name}}}", "", line, "", _text(entry.comment), ""]
    out += ["## Shipped configs {#shipped-configs}", ""]
    for name, (doc, _) in variants.items():
        out += [f"### `{name}` {{#config-{name}}}", ""]
        if doc:
            out += ["```", doc.strip(), "```", ""]
        out += ["It changes:", ""]
        out += [f"- [`{k}`](#{k}): {_code(v)}" for k, v in overrides[name].items()] or ["- nothing"]
        out.append("")
    return "\n".join(out)


def _shipped_config_reference() -> str:
    default = importlib.import_module("admmprune.configs.default")
    with open(os.path.join(CONFIG_DIR, "default.py")) as f:
        source = f.read()
    variants = {}
    for file in sorted(os.listdir(CONFIG_DIR)):
        name = file[:-3]
        if file.endswith(".py") and not file.startswith("_") and name != "default":
            module = importlib.import_module(f"admmprune.configs.{name}")
            variants[name] = (module.__doc__ or "", module.get_config())
    return config_reference(source, default.get_config(), variants)


# --- the command-line reference ----------------------------------------------------


@contextlib.contextmanager
def _columns(width: int) -> Iterator[None]:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # the help wraps to the terminal's width
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def cli_reference(parsers: dict[str, Any]) -> str:
    """The Markdown of the command-line reference: each command's ``--help``
    and a table of its arguments.

    Args:
        parsers: ``{module name: admmprune.app.cli.Parser}`` (what each
            command's ``build_parser()`` returns).
    """
    out = [
        "# Command line",
        "",
        "Generated from the commands' argument parsers when the site is built: this is",
        "what `--help` prints. The fields that `--config.FIELD=VALUE` sets are in",
        "[the configuration reference](config.md).",
        "",
    ]
    with _columns(100):
        for module, parser in parsers.items():
            anchor = module.rsplit(".", 1)[-1]
            out += [f"## `python -m {module}` {{#{anchor}}}", "", "```text", parser.format_help().rstrip(), "```", ""]
            out += ["| argument | default | what it is |", "|---|---|---|"]
            for option in parser.options():
                flags = ", ".join(f"`{s}`" for s in option.flags) or f"`{option.name.upper()}`"
                shown = option.default is not None and option.default is not False and not option.required
                default = f"`{option.default}`" if shown else ""
                out.append(f"| {flags} | {default} | {_text(option.help)} |")
            out.append("")
    return "\n".join(out)


def _shipped_cli_reference() -> str:
    return cli_reference({m: importlib.import_module(m).build_parser() for m in CLI_MODULES})


# --- links to repository files ---------------------------------------------------------

_LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def repository_links(markdown: str, page_dir: str, docs_dir: str, root: str, repo_url: str) -> tuple[str, list[str]]:
    """Rewrites relative links from a page in ``page_dir`` to files of the
    repository at ``root`` outside ``docs_dir`` into ``repo_url`` links.

    Returns:
        The new Markdown, and the links whose targets do not exist.
    """
    missing = []

    def sub(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith(("#", "/")):
            return m.group(0)
        path, _, fragment = target.partition("#")
        full = os.path.normpath(os.path.join(page_dir, path))
        if full == docs_dir or full.startswith(docs_dir + os.sep) or not full.startswith(root + os.sep):
            return m.group(0)  # a page of the site (mkdocs checks it), or outside the repository
        if not os.path.exists(full):
            missing.append(target)
            return m.group(0)
        kind = "tree" if os.path.isdir(full) else "blob"
        url = f"{repo_url.rstrip('/')}/{kind}/{BRANCH}/{os.path.relpath(full, root).replace(os.sep, '/')}"
        return f"{m.group(1)}{url}{'#' + fragment if fragment else ''}{m.group(3)}"

    out, fenced = [], False
    for line in markdown.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        out.append(line if fenced else _LINK.sub(sub, line))
    return "\n".join(out), missing


# --- reStructuredText in docstrings -----------------------------------------------------

_ROLE = re.compile(r":(?:py:)?(func|class|mod|meth|attr|data|exc|obj):`([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
#: Roles whose targets live outside admmprune: shown as code, not linked
#: (the build has no network to fetch those projects' inventories).
EXTERNAL = ("jax", "jnp", "np", "numpy", "optax", "flax", "nnx", "functools", "orbax", "grain", "tfds", "scipy")


def _role(m: re.Match) -> str:
    text = m.group(2).strip()
    shown, target = text, text
    explicit = re.fullmatch(r"(.*?)\s*<([^>]+)>", text, re.DOTALL)
    if explicit:
        shown, target = explicit.group(1), explicit.group(2)
    if target.startswith("~"):
        target = target[1:]
        shown = target.rsplit(".", 1)[-1]
    if m.group(1) in ("func", "meth") and not explicit:
        shown += "()" if not shown.endswith(")") else ""
    if m.group(1) == "attr" or target.split(".")[0] in EXTERNAL or any(p.startswith("_") for p in target.split(".")):
        return f"`{shown}`"  # attributes (documented in their class's Attributes section), private or external
    return f"[`{shown}`][{target}]"


def rst_to_markdown(text: str) -> str:
    """The reStructuredText of a docstring as Markdown: ``.. math::`` blocks as
    ``$$`` blocks (multi-line ones in ``aligned``), ``:math:`x``` as ``$x$``,
    ``:func:`x``` and the other roles as cross-references ``[`x()`][x]``
    (resolved in the object's scope; ``~`` shows the last name only; ``:attr:``,
    private and other projects' targets as code only), and a
    paragraph ending in ``::`` before a literal block as ending in ``:``.
    """
    lines = text.split("\n")
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)\.\. math::\s*(.*)$", line)
        if not m:
            out.append(line)
            i += 1
            continue
        indent, body = m.group(1), [m.group(2)] if m.group(2).strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            if not lines[i].strip() and (
                i + 1 >= len(lines)
                or not lines[i + 1].strip()
                or len(lines[i + 1]) - len(lines[i + 1].lstrip()) <= len(indent)
            ):
                break
            body.append(lines[i].strip())
            i += 1
        math = "\n".join(b for b in body if b)
        if "&" in math or "\\\\" in math:
            math = "\\begin{aligned}\n" + math + "\n\\end{aligned}"
        out += [f"{indent}$$"] + [f"{indent}{b}" for b in math.split("\n")] + [f"{indent}$$"]
    text = "\n".join(out)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    text = _ROLE.sub(_role, text)
    return re.sub(r"(\S)::\n(\s*\n)", r"\1:\n\2", text)


try:
    import griffe
except ImportError:  # the docs extra is not installed: the hooks still import
    griffe = None
else:

    class RstToMarkdown(griffe.Extension):
        """Rewrites every docstring with :func:`rst_to_markdown` as it is loaded."""

        def on_object(self, *, obj, **kwargs):
            if obj.docstring is None and obj.is_attribute and obj.lineno and obj.filepath:
                comment = _sphinx_comment(str(obj.filepath), obj.lineno)
                if comment:
                    obj.docstring = griffe.Docstring(comment, lineno=obj.lineno, parent=obj)
            if obj.docstring is not None:
                obj.docstring.value = rst_to_markdown(obj.docstring.value)


def _sphinx_comment(path: str, lineno: int) -> str:
    """The ``#:`` comment lines right above line ``lineno`` (1-based) of a file:
    how Sphinx documents a module attribute, which griffe does not read."""
    with open(path) as f:
        lines = f.read().splitlines()
    found, i = [], lineno - 2
    while i >= 0 and lines[i].strip().startswith("#:"):
        found.append(lines[i].strip()[2:].strip())
        i -= 1
    return "\n".join(reversed(found))


# --- the hooks ----------------------------------------------------------------------------


def on_files(files, config):
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    try:
        pages = {"reference/config.md": _shipped_config_reference(), "reference/cli.md": _shipped_cli_reference()}
    except ValueError as e:
        raise PluginError(f"docs/_hooks.py: {e}") from e
    for uri, content in pages.items():
        files.append(File.generated(config, uri, content=content))
    return files


def on_page_markdown(markdown, page, config, files):
    # Links resolve as from the repository's docs/ (where GitHub shows the
    # pages), whatever docs_dir a test build uses; generated pages too.
    docs_dir = os.path.join(ROOT, "docs")
    page_dir = os.path.dirname(os.path.join(docs_dir, page.file.src_uri))
    markdown, missing = repository_links(markdown, page_dir, docs_dir, ROOT, config["repo_url"])
    for target in missing:
        log.warning("Doc file '%s' links to '%s', which is not in the repository.", page.file.src_uri, target)
    return markdown
