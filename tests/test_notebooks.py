"""The Colab notebooks in notebooks/ run top to bottom (nbclient), as a user runs them.

The kernel gets one CPU device (not conftest's 8 simulated ones) and XLA's cheap compile
mode: compiles dominate these notebooks, and the numbers they print do not depend on it.
"""

import datetime
import pathlib
import re
import time

import nbclient
import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT_S = 300

# Test-only sizes, swapped into the cells' source before the run (the committed notebook, what
# a user runs, keeps its own): the figures need a trained model, not a well-trained one, and
# the asserts below do not read the numbers. Each original line must occur exactly once.
TEST_SIZES = {
    "structsa_explained.ipynb": [("config.num_train_steps = 300\n",
                                  "config.num_train_steps = 30\n")],
}


def _apply_test_sizes(name: str, nb) -> None:
  for old, new in TEST_SIZES.get(name, []):
    cells = [c for c in nb.cells if c.cell_type == "code" and old in c.source]
    assert len(cells) == 1 and cells[0].source.count(old) == 1, f"{name}: {old!r} not found once"
    cells[0].source = cells[0].source.replace(old, new)


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


def _cell_seconds(nb) -> dict[int, float]:
  """Each code cell's run time, from the timestamps nbclient records (where a test's time goes)."""
  out = {}
  for i, cell in enumerate(nb.cells):
    t = cell.get("metadata", {}).get("execution", {})
    if "iopub.execute_input" in t and "shell.execute_reply" in t:
      start, end = (datetime.datetime.fromisoformat(t[k].replace("Z", "+00:00"))
                    for k in ("iopub.execute_input", "shell.execute_reply"))
      out[i] = round((end - start).total_seconds(), 1)
  return out


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
  _apply_test_sizes(name, nb)
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
  print(f"{name}: {elapsed:.1f} s; cells (s): {_cell_seconds(nb)}")
