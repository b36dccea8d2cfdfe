"""notebooks/inspect_latents.ipynb runs top to bottom on the tiny run's checkpoint."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

pytestmark = pytest.mark.e2e


def test_inspect_latents_notebook_runs(full_run, monkeypatch):
  workdir, _ = full_run
  monkeypatch.setenv("UNIMM_WORKDIR", str(workdir))
  nb = nbformat.read(os.path.join(REPO, "notebooks", "inspect_latents.ipynb"), as_version=4)
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": REPO}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "PSNR per image" in text and "distinct codes per group" in text
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 3  # reconstructions, usage/entropy, sign pattern
