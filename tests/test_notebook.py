"""notebooks/quickstart.ipynb runs top to bottom (nbclient, a kernel on this interpreter that
imports this moeyard) and draws its plots; the committed notebook carries no outputs."""
import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

import moeyard  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_notebook_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for c in code:
        assert c.outputs == [] and c.execution_count is None, c.source[:60]


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    # A kernel spec of our own: this interpreter, whatever kernels the machine has installed.
    spec = tmp_path / "kernels" / "moeyard-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "moeyard test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    # The kernel imports the moeyard this test imported (a source tree or an installed copy).
    root = str(Path(moeyard.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get(
        "PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="moeyard-test",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the batch's load and the training plots
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "offsets" in text and "token_row" in text and "MaxVio" in text
    lines = text.splitlines()
    assert any(line.startswith("layer type ") and "held-out" in line for line in lines)
    for name in ("dense", "topk", "remoe"):  # the notebook's TRAIN_LAYERS, one table row each
        assert any(line.startswith(name + " ") for line in lines), name
