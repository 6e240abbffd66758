"""examples/quickstart.ipynb runs top to bottom (at a tiny size) and learns something."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

# Slow: executes the quickstart notebook: two 12-epoch trainings.
pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_executes_and_segments(tmp_path, monkeypatch):
    monkeypatch.setenv("TF_EXPLOG_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    val = float(re.search(r"validation mean Dice: ([0-9.]+)", outputs).group(1))
    test = float(re.search(r"test mean Dice: ([0-9.]+)", outputs).group(1))
    # At 32^3, 12 epochs of a narrow network: measured 0.30 / 0.32; an untrained or
    # inference-broken model scores below 0.05 (the BatchNorm defect gave ~0.01 here).
    assert val > 0.12, outputs
    assert test > 0.15, outputs
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {})]
    assert len(figures) >= 5  # loss terms, curves, Dice by structure, overlays, comparison
    # The comparison the notebook makes: trained the same way, linear Dice finds the large
    # structures and misses the small ones, so its mean is well below ExpLog's. Measured at
    # this size (2026-12, 2-core CPU): large structures 0.48, mean 0.15 against ExpLog's 0.32.
    linear = float(re.search(r"linear Dice test mean Dice: ([0-9.]+)", outputs).group(1))
    large = re.search(r"^\s*large\s+([0-9.]+)\s+([0-9.]+)$", outputs, re.M)
    assert large, outputs
    assert float(large.group(2)) > 0.25, outputs  # linear Dice did learn the large ones
    assert test - linear > 0.08, outputs  # and ExpLog's advantage on the rest shows
