"""benchmarks/throughput.py runs end to end on CPU (so it cannot rot) and its numbers add up."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "throughput.py")


def _load_script():
  spec = importlib.util.spec_from_file_location("benchmarks_throughput", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def smoke_rows():
  """One subprocess (one jax import) covering images (train + infer) and video clips through
  the reference attention (train), each fed by pre-placed inputs and by create_input. Two
  training compiles are most of its ~40 s on a quiet 2-core CPU."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")  # a 2-way 'data' mesh
  cmd = [sys.executable, SCRIPT, "--model=structvit_tiny", "--image_size=32", "--batch=8",
         "--steps=2", "--warmup=1", "--windows=2", "--frames=4", "--dtype=fp32",
         "--peak_tflops=0.5", "--data=pipeline", "--json",
         "--cases=image:fused:both,video:reference:train"]
  p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, f"rc {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr[-4000:]}"
  lines = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
  assert lines[0]["kind"] == "header"
  return lines[0], [l for l in lines[1:] if l["kind"] == "row"]


def test_smoke_rows(smoke_rows):
  header, rows = smoke_rows
  assert header["devices"] == 2 and header["platform"] == "cpu"
  assert "--model=structvit_tiny" in header["command"]
  got = [(r["input"], r["attention"], r["mode"]) for r in rows]
  assert got == [("32", "fused", "infer"), ("32", "fused", "train"),
                 ("4x32", "reference", "train")]
  for r in rows:
    assert "note" not in r or "ERROR" not in r["note"] and r["note"] != "OOM", r
    assert r["step_ms"] > 0 and r["per_sec"] > 0 and r["compiled_mib"] > 0, r
    assert r["per_sec"] == pytest.approx(8 / (r["step_ms"] / 1e3))
    # MFU against the --peak_tflops given, over the 2 devices; training counts 3x forward.
    assert r["mfu_pct"] == pytest.approx(100 * r["tflops"] / (0.5 * 2))
    assert 0 <= r["data_wait_pct"] < 100 and r["pipeline_per_sec"] > 0, r
  by = {(r["input"], r["attention"], r["mode"]): r for r in rows}
  img_train, img_infer = by["32", "fused", "train"], by["32", "fused", "infer"]
  assert img_train["gflops_per_example"] == pytest.approx(3 * img_infer["gflops_per_example"])
  assert by["4x32", "reference", "train"]["gflops_per_example"] > img_train["gflops_per_example"]
  # The training step holds params + AdamW moments + activations: more than inference.
  assert img_train["compiled_mib"] > img_infer["compiled_mib"]


def test_peak_table_and_rows():
  t = _load_script()
  assert t.device_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
  assert t.device_peak_tflops("NVIDIA H200") == pytest.approx(989.4)
  assert t.device_peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
  assert t.device_peak_tflops("TPU v5 lite") == 197.0
  assert t.device_peak_tflops("TPU v4 lite") is None  # v4i, not v4
  assert t.device_peak_tflops("cpu") is None
  assert t.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 bytes"))
  assert not t.is_oom(ValueError("bad shape"))
  line = t.table_row(dict(model="m", batch=8, step_ms=12.345, note="OOM"))
  assert line.startswith("| m | n/a |") and "| 12.3 |" in line and line.endswith("| OOM |")
  with pytest.raises(SystemExit):
    t.parse_args(["--model=nope"])
  with pytest.raises(SystemExit):
    t.parse_args(["--cases=image:fast:train"])
