"""The quickstart notebook runs top to bottom (in a temporary working directory: it writes runs/ there)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "\n".join(output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
                        for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    assert "multiobject-gru-s0" in outputs                                  # the shipped models were listed
    assert (tmp_path / "runs" / "nb-gru-gru" / "results.json").is_file()    # compare() wrote its run here
    assert "intervened GRU: B D1 T R R R R R R R E" in outputs               # 7 responses after the swap
