"""examples/quickstart.ipynb runs top to bottom on a fresh kernel (``-m "not notebook"`` skips it)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "quickstart.ipynb")

pytestmark = pytest.mark.notebook


def test_quickstart_notebook_runs(chat_llama_dir, tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "commit it with outputs cleared"
    monkeypatch.setenv("PAGEDLM_EXAMPLE_MODEL", chat_llama_dir)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # Any cell's exception fails the test (nbclient raises CellExecutionError).
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    streams = [out for cell in code for out in cell.outputs if out.output_type == "stream"]
    stderr = "".join(out.text for out in streams if out.name == "stderr")
    assert "IProgress not found" not in stderr and "Traceback" not in stderr
    for cell in code:  # a progress bar redraws one line; it never prints a line per update
        text = "".join(out.text for out in cell.outputs if out.output_type == "stream" and out.name == "stderr")
        assert text.count("\n") <= 12, text
    figures = [out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})]
    assert len(figures) == 1
