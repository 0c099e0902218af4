"""docs/tutorial.ipynb runs top to bottom on the default model (slow tier; needs nbclient and ipykernel)."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"


def test_tutorial_notebook_executes(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    # the kernel is a process of its own: give it this worker's share of the cores, not all of them (2 workers x 2
    # threads on 2 cores oversubscribe, and OpenMP's spinning made the notebook ~5x slower than alone)
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # the pictures are inline
    assert sum("text/html" in o.get("data", {}) for o in outputs) >= 3  # results render as HTML
    clean, corrupted = map(float, re.search(r"clean ([-\d.]+) corrupted ([-\d.]+)", text).groups())
    assert clean > 0 > corrupted  # the model agrees the verb with its subject
    assert float(re.search(r"recovered ([\d.]+)", text).group(1)) > 0.5  # the SAE keeps most of the loss
