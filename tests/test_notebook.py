"""examples/quickstart.ipynb is stored executed (top to bottom, no error among its outputs)
and runs top to bottom without a cell error (nbclient, kernel python3, started in
examples/: the notebook's first cell finds the checkout from there); without torch and
transformers its Hugging Face section says so and runs nothing."""

import contextlib
import io
import os
import sys

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "examples", "quickstart.ipynb")


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _images(cells) -> list:
    return [o for c in cells for o in c.outputs if o.get("output_type") == "display_data" and "image/png" in o.data]


def _check_outputs(code) -> None:
    out = "\n".join(_text(c) for c in code)
    assert "max |dsjax - transformers|" in out and "same tokens: True" in out
    assert "values per token per layer" in out
    assert len(_images(code)) == 1  # the expert-load heatmap


def test_the_notebook_is_stored_executed_without_errors():
    nb = nbformat.read(PATH, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "store it run top to bottom"
    errors = [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, f"a stored output is an error: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    assert not any(o.get("name") == "stderr" and "Traceback" in o.get("text", "") for c in code for o in c.outputs)
    _check_outputs(code)
    assert "torch" in nb.cells[0].source and "[hf]" in nb.cells[0].source  # says what it needs, at the top


def test_quickstart_notebook_runs():
    nb = nbformat.read(PATH, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for c in code:
        c.outputs, c.execution_count = [], None
    # The kernel inherits this process's environment: the tests' CPU devices and fast compilation.
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(ROOT, "examples")}}).execute()  # raises on a cell error
    _check_outputs(code)


def test_without_torch_the_hugging_face_section_is_skipped_with_a_note(monkeypatch):
    nb = nbformat.read(PATH, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    i = next(i for i, src in enumerate(code) if "HAVE_HF =" in src)
    assert "DeepseekV3ForCausalLM" in code[i + 1]
    for name in ("torch", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # find_spec finds nothing, import raises
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        namespace: dict = {}
        exec(code[i], namespace)
        exec(code[i + 1], namespace)  # the section: skipped, so it imports nothing
    assert namespace["HAVE_HF"] is False
    assert 'section 2 skipped: it needs torch and transformers (pip install -e ".[hf]")' in printed.getvalue()
