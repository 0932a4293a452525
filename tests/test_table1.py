"""benchmarks/table1.py: the --quick path runs end to end (so it cannot rot) and its table
adds up. No accuracy is asserted: two training steps."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "table1.py")


def _load_script():
  spec = importlib.util.spec_from_file_location("benchmarks_table1", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def test_quick(tmp_path):
  # Two variants x two datasets, one subprocess: the video runs reuse the motion runs'
  # compiled steps (same shapes) through the persistent cache; compiles are most of it.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"))
  env.pop("XLA_FLAGS", None)
  p = subprocess.run([sys.executable, SCRIPT, "--quick", f"--out={tmp_path}"], env=env,
                     cwd=REPO, capture_output=True, text=True, timeout=1200)
  assert p.returncode == 0, f"rc {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr[-4000:]}"
  result = json.loads((tmp_path / "table1.json").read_text())
  assert result["header"]["steps"] == 2 and "--quick" in result["header"]["command"]
  got = [(r["dataset"], r["variant"]) for r in result["rows"]]
  assert got == [("synthetic_motion", "SA"), ("synthetic_motion", "StructSA D=2"),
                 ("synthetic_video", "SA"), ("synthetic_video", "StructSA D=2")]
  assert len(result["runs"]) == 4
  by = {k: r for k, r in zip(got, result["rows"])}
  sa, d2 = by["synthetic_motion", "SA"], by["synthetic_motion", "StructSA D=2"]
  # StructSA adds U^K and U^V (and a little compute) over SA; same model on both datasets.
  assert d2["params"] > sa["params"] > 0 and d2["gflops"] > sa["gflops"] > 0
  assert by["synthetic_video", "SA"]["params"] == sa["params"]
  for r in result["rows"]:
    assert 0.0 <= r["top1_mean"] <= 1.0 and r["wall_s_mean"] > 0
  table = (tmp_path / "table1.md").read_text()
  assert "| StructSA D=2 | 2 | 1 | context |" in table and "Chance 0.125" in table
  assert table.count("| SA | 0 | 1 | context |") == 2


def test_variants_and_summary():
  t = _load_script()
  assert t.structsa_kwargs(*t.VARIANTS["ConvSA"]) == dict(d=1, stride=1, aggregation="context")
  assert t.VARIANTS["SA"][0] == 0 and t.VARIANTS["StructSA D=4 stride 2"][:2] == (4, 2)
  args = t.parse_args([])
  assert args.seeds == 3 and args.coherence == t.COHERENCE
  c = t.make_config("synthetic_motion", "StructSA D=4", 2, args)
  assert (c.seed, c.model.kwargs.d, c.data.coherence, c.num_train_steps) == (2, 4,
                                                                              t.COHERENCE,
                                                                              args.steps)
  run = dict(dataset="x", variant="SA", d=0, stride=1, aggregation="context", params=10,
             gflops=0.5)
  rows = t.summarize([dict(run, seed=s, top1=a, wall_s=w)
                      for s, (a, w) in enumerate([(0.5, 10.0), (0.7, 20.0), (0.6, 30.0)])])
  assert len(rows) == 1
  assert rows[0]["top1_mean"] == pytest.approx(0.6)
  assert rows[0]["top1_std"] == pytest.approx(0.1)
  assert rows[0]["wall_s_mean"] == pytest.approx(20.0)
  with pytest.raises(SystemExit):
    t.parse_args(["--variants=SA,StructSA D=9"])
