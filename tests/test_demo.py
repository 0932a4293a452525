"""The README's main command, as a user runs it: the demo trains to far above chance."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_reaches_its_accuracy(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user
  workdir = tmp_path / "demo"
  proc = subprocess.run([sys.executable, "-m", "structvit_jax.main", "--config=configs/demo.py",
                         f"--workdir={workdir}"], cwd=os.path.dirname(os.path.dirname(__file__)),
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / "eval_results.jsonl").read_text().splitlines()]
  final = rows[-1]
  assert final["eval/count"] == 2000          # every validation example, exactly once
  assert final["eval/top1"] >= 0.7, rows      # chance is 0.1; 0.875 measured
  assert (workdir / "checkpoints").is_dir() and (workdir / "tensorboard").is_dir()
  # The log a person reads (issue 13: it was 314 lines, 143 of them Orbax's), with the same
  # information: the model, every progress line, both evaluations, the saves.
  log = (proc.stdout + proc.stderr).splitlines()
  assert len(log) < 80, "\n".join(log)
  assert sum("ETA" in line for line in log) == 1560 // 50 + 1, "\n".join(log)
  assert sum("eval step" in line for line in log) == 2, "\n".join(log)
  assert "Model structvit_tiny (UniFormer)" in proc.stderr
  assert sum("Checkpoint: saving step" in line for line in log) == 4, "\n".join(log)


def test_missing_dataset_is_one_clear_error(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "structvit_jax.main", "--config=configs/in1k_s.py",
                         f"--workdir={tmp_path}", f"--config.data.data_dir={tmp_path}/nowhere"],
                        cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "imagenet2012" in last and "nowhere" in last, last
  assert "Traceback" not in proc.stderr
