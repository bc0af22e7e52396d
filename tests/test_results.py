"""The README's and the docs' results are what benchmarks/results/*.json say.

``benchmarks/results.py`` renders every results table from the benchmarks'
JSON; these tests fail when a table in the README or docs was edited by hand,
or when a result was rerun without rendering.
"""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("benchmark_results", ROOT / "benchmarks" / "results.py")
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)


@pytest.fixture(scope="module")
def res():
    return results.load()


def test_every_benchmark_has_results_with_machine_and_date(res):
    for name in results.BENCHMARKS:
        assert name in res, f"benchmarks/results/{name}.json is missing: python benchmarks/results.py --only {name}"
        r = res[name]
        assert r["machine"] and r["date"] and r["rows"]


def test_readme_and_docs_are_what_the_results_render_to(res):
    assert results.check(res) == []


def test_every_block_is_shown_somewhere(res):
    shown = "".join((ROOT / p).read_text() for p in results.MARKED)
    for name in results.blocks(res):
        assert f"<!-- results:{name} -->" in shown, name


def test_headline_has_every_method_of_every_case(res):
    text = results.headline(res)
    for case in results.CASES:
        for row in res[f"compare_{case}"]["rows"]:
            assert f"| {row['method']} | " in text
        assert res[f"compare_{case}"]["date"] in text and res[f"compare_{case}"]["machine"] in text


def test_fill_replaces_only_marked_blocks_and_is_idempotent():
    text = "intro\n<!-- results:a -->\nold\n<!-- /results:a -->\nmiddle\n<!-- results:b -->\n<!-- /results:b -->\nend\n"
    blocks = {"a": "| x |", "b": "B"}
    once = results.fill(text, blocks)
    assert (
        once == "intro\n<!-- results:a -->\n| x |\n<!-- /results:a -->\nmiddle\n<!-- results:b -->\nB\n"
        "<!-- /results:b -->\nend\n"
    )
    assert results.fill(once, blocks) == once
    with pytest.raises(KeyError, match="no results block named 'c'"):
        results.fill("<!-- results:c -->\n<!-- /results:c -->", blocks)


def test_provenance_names_command_machine_and_date():
    line = results._provenance(
        {
            "machine": "x86_64, 2 cores",
            "date": "2026-11-22",
            "jax": "0.10.2",
            "command": "python benchmarks/x.py --a 1",
            "load_average": 3.5,
        },
        "x",
    )
    assert "python benchmarks/x.py --a 1" in line and "2026-11-22" in line and "x86_64, 2 cores" in line
    assert "jax 0.10.2" in line and "3.5" in line


def test_figures_render_from_the_results(res, tmp_path):
    written = results.figures(res, out_dir=str(tmp_path))
    assert written
    for name in written:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    page = results.results_page(res, results.blocks(res))
    for name in written:  # the results page shows every figure it draws
        assert f"(figures/{name})" in page


def test_results_json_files_are_valid():
    paths = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert paths, "no benchmark results to check"
    for path in paths:
        json.loads(path.read_text())
