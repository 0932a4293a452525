"""benchmarks/gpu_report.sh runs every part (throughput, fused vs reference video, one
StructSA layer, depthwise, start-up) end to end on CPU with --dry_run, so the GPU report
cannot rot before a GPU runs it."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("## Throughput", "## Fused vs reference StructSA, video",
         "## One StructSA layer, fused vs reference", "## Depthwise convolutions",
         "## Start-up (time to the first step)")


@pytest.mark.slow  # five scripts, eight small compiles and two trainer starts
def test_dry_run_writes_every_part(tmp_path):
  out = tmp_path / "report.md"
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             PYTHON=sys.executable)
  env.pop("XLA_FLAGS", None)
  r = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_report.sh"), "--dry_run",
                      f"--out={out}"], env=env, cwd=tmp_path, capture_output=True, text=True,
                     timeout=1800)
  report = out.read_text()
  assert r.returncode == 0, f"{r.stderr[-3000:]}\n{report[-5000:]}"
  assert "DRY RUN" in report and "FAILED" not in report
  assert report.startswith("# StructViT-JAX GPU report") and "(cpu)" in report
  sections = report.split("\n## ")
  assert ["## " + s.split("\n")[0] for s in sections[1:]] == list(PARTS)
  for s in sections[1:]:  # every part printed a table with at least one row
    rows = [l for l in s.splitlines() if l.startswith("|") and not l.startswith("|---")]
    assert len(rows) >= 2, s
  startup = sections[-1]
  assert "| first |" in startup and "| restart 1 |" in startup


def test_unknown_argument_is_an_error(tmp_path):
  r = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_report.sh"), "--gpu"],
                     cwd=tmp_path, capture_output=True, text=True, timeout=60)
  assert r.returncode == 2 and "unknown argument --gpu" in r.stderr
