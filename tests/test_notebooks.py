"""The notebooks run top to bottom on tiny runs' checkpoints."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

pytestmark = pytest.mark.e2e


def _run_notebook(name: str, workdir, monkeypatch) -> list:
  """Executes notebooks/<name> on `workdir`; returns its code cells' outputs."""
  monkeypatch.setenv("UNIMM_WORKDIR", str(workdir))
  nb = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": REPO}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  return outputs


def test_inspect_latents_notebook_runs(full_run, monkeypatch):
  outputs = _run_notebook("inspect_latents.ipynb", full_run[0], monkeypatch)
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "PSNR per image" in text and "distinct codes per group" in text
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 3  # reconstructions, usage/entropy, sign pattern


def test_evotok_trajectory_notebook_runs(evotok_run, monkeypatch):
  outputs = _run_notebook("evotok_trajectory.ipynb", evotok_run[0], monkeypatch)
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "depth  4: PSNR" in text and "cluster sizes" in text
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2  # reconstructions per depth, k-means maps per depth
