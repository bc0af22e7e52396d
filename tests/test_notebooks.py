"""Every notebook in notebooks/ runs, top to bottom, against the smoke config.

The convention every notebook follows (checked here):

- Its first code cell is the Colab install cell: on Colab (and only there) it
  pip-installs admmprune from the repository named in pyproject.toml.
- A code cell tagged ``parameters`` sets ``SMOKE = False`` and
  ``WORKDIR = ...``. Like papermill, the test inserts a cell after it that sets
  ``SMOKE = True`` (the notebook then uses ``configs/smoke.py`` and fewer
  cases) and a fresh ``WORKDIR``.

The notebooks run in a real IPython kernel (nbclient), so magics, plots and
display calls are exercised as a user would see them.
"""

import pathlib
import re
import tomllib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
EXPECTED = {"quickstart", "bring_your_own_model", "criteria_analysis", "method_comparison"}


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_every_notebook_the_docs_promise_exists():
    assert EXPECTED <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_follows_the_convention(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    install = _code_cells(nb)[0].source
    assert "google.colab" in install, "the first code cell installs on Colab only"
    urls = re.findall(r"git\+(https://\S+?)[\"'\s@#]", install)
    assert urls and all(u.rstrip("/").removesuffix(".git") == REPOSITORY for u in urls), urls
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "SMOKE = False" in params[0].source and "WORKDIR" in params[0].source
    assert all(not c.outputs for c in _code_cells(nb)), "commit notebooks without outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_the_smoke_config(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell(f"SMOKE = True\nWORKDIR = {str(tmp_path / 'work')!r}")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, injected)
    client = nbclient.NotebookClient(
        # "python3" is ipykernel's spec for this interpreter (the venv's) unless a user installed another.
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    client.execute()
    errors = [o for c in _code_cells(nb) for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
