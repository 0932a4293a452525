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
FAST_COMPILES = True  # XLA's cheap compile mode (conftest.py) for the in-process probe's 5 steps


def _load_script():
  spec = importlib.util.spec_from_file_location("benchmarks_table1", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def test_quick(tmp_path):
  # The default backbone (the video DeiT), two variants x two datasets, --jobs=2: two
  # spawned worker processes, the path of the default (non-quick) run. The video runs reuse
  # the motion runs' compiled steps (same shapes) through the persistent cache.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"))
  env.pop("XLA_FLAGS", None)
  p = subprocess.run([sys.executable, SCRIPT, "--quick", "--jobs=2", f"--out={tmp_path}",
                      "--datasets=synthetic_motion,synthetic_video"], env=env,
                     cwd=REPO, capture_output=True, text=True, timeout=1200)
  assert p.returncode == 0, f"rc {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr[-4000:]}"
  result = json.loads((tmp_path / "table1.json").read_text())
  assert result["header"]["steps"] == 2 and "--quick" in result["header"]["command"]
  assert result["header"]["jobs"] == 2 and result["header"]["backbone"] == "deit"
  got = [(r["dataset"], r["variant"], r["init"]) for r in result["rows"]]
  assert got == [("synthetic_motion", "SA", ""), ("synthetic_motion", "StructSA D=2", "torch"),
                 ("synthetic_video", "SA", ""), ("synthetic_video", "StructSA D=2", "torch")]
  assert len(result["runs"]) == 4
  by = {k[:2]: r for k, r in zip(got, result["rows"])}
  sa, d2 = by["synthetic_motion", "SA"], by["synthetic_motion", "StructSA D=2"]
  # StructSA adds U^K and U^V (and a little compute) over SA; same model on both datasets.
  assert d2["params"] > sa["params"] > 0 and d2["gflops"] > sa["gflops"] > 0
  assert by["synthetic_video", "SA"]["params"] == sa["params"]
  for r in result["rows"]:
    assert 0.0 <= r["top1_mean"] <= 1.0 and r["wall_s_mean"] > 0
  # The kernels' movement: torch init is ~26/27 off-centre; two steps move it a little.
  assert "u_k_moved_mean" not in sa
  assert 0.9 < d2["u_k_offcentre_init_mean"] < 1.0 and 0.0 < d2["u_k_moved_mean"] < 1.0
  table = (tmp_path / "table1.md").read_text()
  assert "| StructSA D=2 | torch | 2 | 3 | context |" in table and "Chance 0.125" in table
  assert "Table 1a, init torch" in table and table.count("| SA | - | 0 | 3 | context |") == 2


def test_variants_and_summary():
  t = _load_script()
  assert t.structsa_kwargs(*t.VARIANTS["ConvSA"]) == dict(
      structsa=dict(d=1, stride=1, aggregation="context", kernel_size=3))
  assert t.structsa_kwargs(*t.VARIANTS["StructSA D=4 M=5"], init="centre") == dict(
      structsa=dict(d=4, stride=1, aggregation="context", kernel_size=5, init="centre"))
  assert t.VARIANTS["SA"][0] == 0 and t.VARIANTS["StructSA D=4 stride 2"][:2] == (4, 2)
  args = t.parse_args([])
  deit = t.DEFAULTS["deit"]
  assert args.seeds == 3 and args.coherence == deit["coherence"] == 1.0 and args.jobs >= 1
  assert (args.steps, args.lr, args.speed) == (deit["steps"], deit["lr"], deit["speed"])
  assert args.backbone == "deit" and args.inits == "torch,centre"
  assert args.variants.split(",") == list(t.DEFAULTS["deit"]["variants"])
  assert t.parse_args(["--quick"]).jobs == 1
  c = t.make_config("synthetic_motion", "StructSA D=4", 2, args, init="centre")
  assert (c.seed, c.model.kwargs.structsa.d, c.data.coherence, c.num_train_steps) == (2, 4,
                                                                              1.0, 600)
  assert c.model.name == "deit_tiny" and c.model.kwargs.temporal_patch_size == 1
  assert c.model.kwargs.structsa.init == "centre"
  uniformer = t.parse_args(["--backbone=structvit_tiny"])
  assert uniformer.datasets == "synthetic_motion,synthetic_video" and uniformer.inits == "centre"
  assert (uniformer.coherence, uniformer.steps, uniformer.lr) == (t.COHERENCE, 300, 3e-3)
  c = t.make_config("synthetic_motion", "StructSA D=4", 0, uniformer, init="centre")
  assert c.model.name == "structvit_tiny" and c.model.kwargs.structsa.init == "centre"
  run = dict(dataset="x", variant="SA", d=0, stride=1, aggregation="context", params=10,
             gflops=0.5)
  rows = t.summarize([dict(run, seed=s, top1=a, wall_s=w)
                      for s, (a, w) in enumerate([(0.5, 10.0), (0.7, 20.0), (0.6, 30.0)])])
  assert len(rows) == 1
  assert rows[0]["top1_mean"] == pytest.approx(0.6)
  assert rows[0]["top1_std"] == pytest.approx(0.1)
  assert rows[0]["wall_s_mean"] == pytest.approx(20.0)
  d4 = t.summarize([dict(run, variant="StructSA D=4", d=4, init="torch", seed=s, top1=a,
                         wall_s=1.0) for s, a in enumerate([0.8, 0.9, 1.0])])[0]
  diff, two_se = t.versus_sa(d4, rows[0])
  assert diff == pytest.approx(0.3) and two_se == pytest.approx(2 * (0.02 / 3) ** 0.5)
  with pytest.raises(SystemExit):
    t.parse_args(["--variants=SA,StructSA D=9"])
  with pytest.raises(SystemExit):
    t.parse_args(["--jobs=0"])
  with pytest.raises(SystemExit):
    t.parse_args(["--inits=xavier"])


def test_kernel_movement_measures_the_off_centre_share():
  t = _load_script()
  import numpy as np
  u = np.zeros((3, 3, 3, 2, 4))
  u[1, 1, 1] = 1.0
  assert t._off_centre_share(u) == 0.0
  u[0, 0, 0] = 1.0
  assert t._off_centre_share(u) == pytest.approx(0.5)


def test_merge_parts(tmp_path):
  t = _load_script()
  header = dict(command="c", date="d", machine="m", coherence=0.5, steps=3, batch=2, lr=1e-3,
                warmup_steps=1, image_size=32, frames=4, train_examples=8, eval_examples=4,
                model_kwargs={}, xla_opt=False)
  run = dict(dataset="synthetic_motion", variant="SA", d=0, stride=1, aggregation="context",
             params=10, gflops=0.5, wall_s=1.0, cpu_s=1.0)
  for i, (seeds, wall) in enumerate([((0, 1), 50.0), ((2,), 70.0)]):
    part = t.write(str(tmp_path), header, [dict(run, seed=s, top1=0.2 * (s + 1)) for s in seeds],
                   wall)
    (tmp_path / f"part{i}.json").write_text(json.dumps(part))
  merged = t.main([f"--merge={tmp_path / 'part0.json'},{tmp_path / 'part1.json'}",
                   f"--out={tmp_path / 'merged'}"])
  (row,) = merged["rows"]
  assert row["top1"] == pytest.approx([0.2, 0.4, 0.6]) and row["top1_mean"] == pytest.approx(0.4)
  assert merged["header"]["total_wall_s"] == 70.0 and len(merged["runs"]) == 3
  assert "0.400 ± 0.200 | 3 |" in (tmp_path / "merged" / "table1.md").read_text()
  bad = json.loads((tmp_path / "part1.json").read_text())
  bad["header"]["steps"] = 4
  (tmp_path / "part1.json").write_text(json.dumps(bad))
  with pytest.raises(ValueError, match="steps"):
    t.main([f"--merge={tmp_path / 'part0.json'},{tmp_path / 'part1.json'}",
            f"--out={tmp_path / 'merged'}"])


def test_motion_probe_runs():
  """benchmarks/motion_probe.py (the pilots of the Table 1 settings) cannot rot: 5 steps."""
  spec = importlib.util.spec_from_file_location(
      "benchmarks_motion_probe", os.path.join(REPO, "benchmarks", "motion_probe.py"))
  probe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(probe)
  top1 = probe.main(["--steps=5", "--qkv_scale=4"])
  assert 0.0 <= top1 <= 1.0
