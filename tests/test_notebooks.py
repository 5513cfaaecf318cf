"""The research notebooks: stored without outputs, each with a `parameters` cell, and each runs top to bottom in
a fresh kernel (nbclient) with its CPU defaults."""

import os
import pathlib

import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_the_five_notebooks_are_there():
    assert [p.stem.split("_", 1)[1] for p in NOTEBOOKS] == ["quickstart", "routing", "long_context", "pods", "cispo"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs_and_has_a_parameters_cell(path):
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs: strip them"
    tagged = [i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and book.cells[tagged[0]].cell_type == "code"
    assert all(c.cell_type == "markdown" for c in book.cells[:tagged[0]])  # parameters before any code


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, tmp_path):
    """Executes every cell in a python3 kernel (this interpreter) with the test session's environment (8 CPU
    devices); an exception in any cell fails the test with the cell's traceback."""
    from nbclient import NotebookClient

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.chdir(tmp_path)
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
