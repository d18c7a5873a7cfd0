"""examples/quickstart.ipynb runs top to bottom without a cell error (nbclient, kernel
python3, started in examples/: the notebook's first cell finds the checkout from there)."""

import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "examples", "quickstart.ipynb")


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_quickstart_notebook_runs():
    nb = nbformat.read(PATH, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "store the notebook without outputs"
    # The kernel inherits this process's environment: the tests' CPU devices and fast compilation.
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(ROOT, "examples")}}).execute()  # raises on a cell error
    out = "\n".join(_text(c) for c in code)
    assert "max |dsjax - transformers|" in out and "same tokens: True" in out
    assert "values per token per layer" in out
    images = [o for c in code for o in c.outputs if o.get("output_type") == "display_data" and "image/png" in o.data]
    assert len(images) == 1  # the expert-load heatmap
