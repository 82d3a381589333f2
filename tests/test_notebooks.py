"""Run every notebook in examples/ top to bottom in a fresh kernel."""

from __future__ import annotations

import contextlib
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

EXAMPLES = Path(__file__).parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
# Seconds one cell may run before the test fails, far above what any cell needs.
CELL_TIMEOUT = 120


def test_examples_exist():
    names = {path.name for path in NOTEBOOKS}
    assert {
        "instance_manager.ipynb",
        "langchain_rag.ipynb",
        "llama_index_rag.ipynb",
    } <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_saved_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {cell.id} of {path.name} has outputs"
            assert cell.execution_count is None


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs(path):
    notebook = nbformat.read(path, as_version=4)
    # The kernel runs with this interpreter ("python" in the kernel spec is
    # replaced by sys.executable) in the notebook's folder, as in Jupyter.
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    with client.setup_kernel():
        try:
            for index, cell in enumerate(notebook.cells):
                client.execute_cell(cell, index)
        except CellExecutionError:
            stop_servers(client, notebook)
            raise
    last = notebook.cells[-1]
    assert last.cell_type == "code"
    assert "stop" in last.source


def stop_servers(client: NotebookClient, notebook: nbformat.NotebookNode) -> None:
    """Run the last cell, which stops every server the notebook started.

    The instance manager's servers run in their own sessions and would outlive
    the kernel.
    """
    last = len(notebook.cells) - 1
    # The cell that failed first is the error to report, not this one's.
    with contextlib.suppress(CellExecutionError):
        client.execute_cell(notebook.cells[last], last)
