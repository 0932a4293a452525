"""The Colab notebooks in notebooks/ run top to bottom (nbclient), as a user runs them.

The kernel gets one CPU device (not conftest's 8 simulated ones) and XLA's cheap compile
mode: compiles dominate these notebooks, and the numbers they print do not depend on it.
"""

import pathlib
import re
import time

import nbclient
import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT_S = 300


@pytest.fixture
def kernel_env(monkeypatch, tmp_path):
  # The kernel inherits this process's environment when it starts.
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' tempfile dirs, cleaned by pytest
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows figures
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")


def _images(nb) -> int:
  return sum("image/png" in o.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
             for o in cell.get("outputs", []))


def _error_outputs(nb) -> list[str]:
  return [f"cell {i}: {o.get('ename')}: {o.get('evalue')}"
          for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
          for o in cell.get("outputs", []) if o.get("output_type") == "error"]


# name, figures it must display (the plots are the point of both notebooks)
@pytest.mark.parametrize("name,figures", [("quickstart.ipynb", 1),
                                          ("structsa_explained.ipynb", 3)])
def test_notebook_runs(name, figures, tmp_path, kernel_env):
  src = NOTEBOOKS / name
  nb = nbformat.read(src, as_version=4)
  # Committed without outputs: clean diffs, and Colab users see their own run.
  stale = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
           and (c.get("outputs") or c.get("execution_count") is not None)]
  assert not stale, f"{name}: cells {stale} have saved outputs; clear them before committing"
  # tmp_path as the working directory: nothing the notebook writes lands in the repo.
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  start = time.time()
  failure = None
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    failure = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the kernel's traceback is coloured
  elapsed = time.time() - start
  if failure is not None:  # outside the except: the cell's traceback once, not chained
    pytest.fail(f"{name} failed in a cell:\n{failure}", pytrace=False)
  assert not _error_outputs(nb), _error_outputs(nb)
  assert _images(nb) >= figures, f"{name} displayed {_images(nb)} figures, expected {figures}"
  print(f"{name}: {elapsed:.1f} s")
