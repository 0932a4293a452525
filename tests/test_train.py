"""End-to-end trainer tests on the tiny preset and tiny synthetic data.

In-process runs use the 8 simulated CPU devices of conftest.py (or a 1-device mesh);
multi-process, SIGKILL and SIGTERM runs are subprocesses of `structvit_jax.main` that share a
persistent compilation cache, so only the first of them pays the compile.
"""

import functools
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from structvit_jax import train
from structvit_jax import train_state

REPO = pathlib.Path(__file__).resolve().parents[1]

# Small but complete: mixup + cutmix + label smoothing, drop path, EMA, clipping, warm-up.
TINY = {
    "model.name": "structvit_tiny",
    "model.kwargs.drop_path_rate": 0.1,
    "data.image_size": 32,
    "data.train_examples": 256,
    "data.eval_examples": 40,        # 3 eval batches of 16, the last one padded (8 real)
    "batch_size": 16,
    "eval_batch_size": 16,
    "lr_base_batch_size": 16,
    "warmup_epochs": 0.25,           # 16 steps/epoch -> 4 warm-up steps
    "grad_clip_norm": 1.0,
    "ema_decay": 0.9,
    "num_train_steps": 20,
    "num_epochs": 1.25,              # the schedule's epoch: 20 / 1.25 = 16 steps (optim.py)
    "log_every_steps": 5,
    "checkpoint_every_steps": 10,
    "eval_every_epochs": 100.0,      # eval at the end only
}


def set_fields(c: ml_collections.ConfigDict, fields: dict) -> ml_collections.ConfigDict:
  for key, value in fields.items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  from structvit_jax.config_utils import import_sibling
  base = import_sibling(str(REPO / "configs" / "base.py"), "base")
  return set_fields(base.get_base_config(), {**TINY, **overrides})


def write_config_file(path: pathlib.Path, **overrides) -> str:
  fields = {**TINY, **overrides}
  path.write_text(
      "import importlib.util\n"
      f"_s = importlib.util.spec_from_file_location('_base', {str(REPO / 'configs/base.py')!r})\n"
      "_b = importlib.util.module_from_spec(_s); _s.loader.exec_module(_b)\n\n"
      "def get_config():\n"
      "  c = _b.get_base_config()\n"
      f"  for key, value in {fields!r}.items():\n"
      "    *parents, leaf = key.split('.')\n"
      "    node = c\n"
      "    for p in parents:\n"
      "      node = node[p]\n"
      "    node[leaf] = value\n"
      "  return c\n")
  return str(path)


def assert_trees_close(a, b, rtol: float, leaf_rtol: float | None = None) -> None:
  """Relative error in norm over the whole tree, ||a - b|| <= rtol ||b||, and per array
  (<= leaf_rtol, default rtol)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  leaf_rtol = rtol if leaf_rtol is None else leaf_rtol
  diff2 = ref2 = 0.0
  worst, worst_name = 0.0, ""
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d, r = np.sum((x - y) ** 2), np.sum(y ** 2)
    diff2, ref2 = diff2 + d, ref2 + r
    err = np.sqrt(d) / (np.sqrt(r) + 1e-12)
    if err > worst:
      worst, worst_name = err, jax.tree_util.keystr(path)
  total = np.sqrt(diff2) / (np.sqrt(ref2) + 1e-12)
  print(f"relative error: whole tree {total:.2e}; worst array {worst_name} {worst:.2e}")
  assert total <= rtol, f"relative error {total:.3e} > {rtol}"
  assert worst <= leaf_rtol, f"{worst_name}: relative error {worst:.3e} > {leaf_rtol}"


def read_params(workdir: pathlib.Path, step: int | None = None):
  ckdir = workdir / "checkpoints"
  steps = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
  step = steps[-1] if step is None else step
  path = ckdir / str(step) / "state"
  # The target puts every array on one device, whatever topology saved it.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        ocp.StandardCheckpointer().metadata(path).item_metadata)
  state = ocp.StandardCheckpointer().restore(path, target)
  return step, jax.tree.map(np.asarray, state["params"])


# ----------------------------------------------------------------------------- in-process


FAST_COMPILES = True  # XLA's cheap compile mode for this module (conftest.py)


@pytest.fixture(scope="module")
def run_8dev(tmp_path_factory):
  """20 steps on 8 devices; the train step wrapped in chex.assert_max_traces(n=1)."""
  assert jax.device_count() == 8
  workdir = tmp_path_factory.mktemp("run8")
  orig = train_state.train_step
  train_state.train_step = chex.assert_max_traces(orig, n=1)
  try:
    t = time.time()
    state, ev = train.train_and_evaluate(tiny_config(), str(workdir))
    print(f"8-device run: {time.time() - t:.1f} s")
  finally:
    train_state.train_step = orig
  return workdir, jax.device_get(state), ev


def test_one_device_matches_eight(run_8dev, tmp_path):
  _, state8, _ = run_8dev
  state1, _ = train.train_and_evaluate(tiny_config(), str(tmp_path),
                                       devices=jax.devices()[:1])
  state1 = jax.device_get(state1)
  assert int(state1.step) == int(state8.step) == 20
  # Only the summation order of the batch reductions differs. Per array the bound is
  # looser: the attention key bias has an exactly-zero true gradient (softmax is invariant
  # to it), so Adam turns reduction-order noise there into lr-sized steps (~8e-5 measured).
  assert_trees_close(state8.params, state1.params, rtol=1e-5, leaf_rtol=5e-4)
  assert_trees_close(state8.batch_stats, state1.batch_stats, rtol=1e-5, leaf_rtol=5e-4)
  assert_trees_close(state8.ema_params, state1.ema_params, rtol=1e-5, leaf_rtol=5e-4)


def test_train_step_traced_once_and_state(run_8dev):
  workdir, state, ev = run_8dev  # the fixture ran under assert_max_traces(n=1)
  assert int(state.step) == 20
  # Exact evaluation: 40 examples in 3 batches of 16, the padding masked out.
  assert ev["eval/count"] == 40 and ev["eval_ema/count"] == 40
  for k in ("eval/loss", "eval/top1", "eval/top5"):
    assert np.isfinite(ev[k])
  assert 0 <= ev["eval/top1"] <= ev["eval/top5"] <= 1
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [10, 20]
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_eval_only_matches_training_eval(run_8dev):
  workdir, _, ev = run_8dev
  out = train.evaluate(tiny_config(eval_only=True), str(workdir))
  for k in ("eval/loss", "eval/top1", "eval_ema/top1"):
    np.testing.assert_allclose(out[k], ev[k], rtol=1e-5)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  orig = train_state.train_step

  def poisoned(state, batch, **kw):  # loss becomes NaN from step 4 on
    new, m = orig(state, batch, **kw)
    m["loss"] = jnp.where(state.step >= 3, jnp.nan, m["loss"])
    return new, m

  monkeypatch.setattr(train_state, "train_step", poisoned)
  # DeiT (no BatchNorm: an empty batch_stats collection) compiles fastest.
  config = tiny_config(num_train_steps=8, checkpoint_every_steps=1, **{
      "model.name": "deit_tiny"})
  with pytest.raises(FloatingPointError, match=r"at step 4\."):
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps[-1] == 3


def test_fsdp_and_grad_accumulation_train_the_same_model(tmp_path):
  # DeiT has no BatchNorm, so 2 microbatches of 8 give exactly the gradient of one batch
  # of 16 (up to summation order); no mixup / drop path, whose draws depend on the batch.
  common = {"model.name": "deit_tiny", "model.kwargs.drop_path_rate": 0.0, "mixup_alpha": 0.0,
            "cutmix_alpha": 0.0, "num_train_steps": 6, "checkpoint_every_steps": 100,
            "ema_decay": 0.0}
  ref, _ = train.train_and_evaluate(tiny_config(**common), str(tmp_path / "ref"))
  got, ev = train.train_and_evaluate(tiny_config(fsdp=True, grad_accum_steps=2, **common),
                                     str(tmp_path / "fsdp"))
  kernel = got.params["blocks_0"]["mlp"]["fc1"]["kernel"]  # [64, 256]: sharded over 'data'
  assert kernel.sharding.spec != jax.sharding.PartitionSpec() and \
      kernel.addressable_shards[0].data.size == kernel.size // 8
  # Per array as in test_one_device_matches_eight: the key bias (zero true gradient) gets
  # Adam-sized steps from rounding noise; with the CPU einsum attention kernel (its own
  # backward, attention.py) that noise reached 5.7e-4 of the bias here, so the bound is 2e-3.
  assert_trees_close(jax.device_get(got.params), jax.device_get(ref.params), rtol=1e-5,
                     leaf_rtol=2e-3)
  bf16, _ = train.train_and_evaluate(tiny_config(dtype="bfloat16", **common),
                                     str(tmp_path / "bf16"))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.params))
  # bf16 compute: the whole tree stays close (the zero-gradient key bias is noise, as above).
  assert_trees_close(jax.device_get(bf16.params), jax.device_get(ref.params), rtol=2e-2,
                     leaf_rtol=float("inf"))


# ----------------------------------------------------------------------------- subprocesses

SUB_STEPS = 24
SUB = dict(num_train_steps=SUB_STEPS, checkpoint_every_steps=4, log_every_steps=4,
           keep_checkpoints=10)


@pytest.fixture(scope="module")
def sub_env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  env.pop("XLA_FLAGS", None)
  config = write_config_file(tmp_path_factory.mktemp("cfg") / "tiny.py", **SUB)
  return env, config


def main_cmd(config: str, workdir: pathlib.Path, *flags: str) -> list[str]:
  return [sys.executable, "-m", "structvit_jax.main", f"--config={config}",
          f"--workdir={workdir}", *flags]


# The runs compared only at their end (and the resumes, a field a resume may change) save
# only there; the checkpoint every 4 steps is for the runs stopped by a signal. The cadence
# changes no compiled program and no number.
END_SAVE_ONLY = f"--config.checkpoint_every_steps={SUB_STEPS}"


def env_devices(env: dict, n: int) -> dict:
  return dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")


@pytest.fixture(scope="module")
def reference_run(sub_env, tmp_path_factory):
  """Uninterrupted: 1 process x 4 devices."""
  env, config = sub_env
  workdir = tmp_path_factory.mktemp("ref")
  r = subprocess.run(main_cmd(config, workdir, END_SAVE_ONLY), env=env_devices(env, 4),
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-5000:]
  step, params = read_params(workdir)
  assert step == SUB_STEPS
  return params


@pytest.mark.slow
def test_two_processes_match_one_process(sub_env, reference_run, tmp_path):
  """Through the README's launcher, launch/local_multiprocess.sh (the suite's one real run of
  it; tests/test_launch.py checks its arguments): 2 processes x 2 devices, a log per process."""
  env, config = sub_env
  workdir, logs = tmp_path / "w", tmp_path / "logs"
  cmd = ["bash", str(REPO / "launch/local_multiprocess.sh"), "2",
         f"--config={config}", f"--workdir={workdir}", END_SAVE_ONLY]
  r = subprocess.run(cmd, env=dict(env, DEVICES_PER_PROCESS="2", PYTHON=sys.executable,
                                   LOG_DIR=str(logs)),
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  log0 = (logs / "process_0.log").read_text() if (logs / "process_0.log").exists() else ""
  assert r.returncode == 0, r.stderr[-3000:] + log0[-3000:]
  for i in range(2):
    assert f"JAX process {i} / 2" in (logs / f"process_{i}.log").read_text()
  ckdir = workdir / "checkpoints"
  assert sorted(p.name for p in ckdir.iterdir() if p.name.isdigit()) == [str(SUB_STEPS)]
  assert sorted(p.name for p in (ckdir / str(SUB_STEPS) / "data_iter").glob("*.json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  step, params = read_params(workdir)
  assert step == SUB_STEPS
  assert_trees_close(params, reference_run, rtol=1e-5, leaf_rtol=5e-4)


def _start_and_signal(cmd, env, workdir: pathlib.Path, sig: int) -> subprocess.Popen:
  """Starts a run and sends `sig` once its first checkpoint is committed."""
  log = open(workdir.parent / f"{workdir.name}_{sig}.log", "w")
  p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  ckdir = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and p.poll() is None:
    if ckdir.exists() and any(c.name.isdigit() for c in ckdir.iterdir()):
      p.send_signal(sig)
      break
    time.sleep(0.02)
  p.wait(timeout=300)
  log.close()
  return p


@pytest.mark.slow
def test_sigkill_then_restart_matches_uninterrupted(sub_env, reference_run, tmp_path):
  env, config = sub_env
  env4 = env_devices(env, 4)
  workdir = tmp_path / "w"
  p = _start_and_signal(main_cmd(config, workdir), env4, workdir, signal.SIGKILL)
  assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  killed_at, _ = read_params(workdir)
  assert killed_at < SUB_STEPS
  r = subprocess.run(main_cmd(config, workdir, END_SAVE_ONLY), env=env4, cwd=REPO,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-5000:]
  assert "Checkpoint: restored step" in r.stderr
  step, params = read_params(workdir)
  assert step == SUB_STEPS
  # Same devices, same programs, same data order: expected bitwise on CPU; allow 1e-6.
  assert_trees_close(params, reference_run, rtol=1e-6)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes(sub_env, reference_run, tmp_path):
  env, config = sub_env
  env4 = env_devices(env, 4)
  workdir = tmp_path / "w"
  p = _start_and_signal(main_cmd(config, workdir), env4, workdir, signal.SIGTERM)
  assert p.returncode == 0
  saved, _ = read_params(workdir)
  assert saved < SUB_STEPS, "the run ended before SIGTERM arrived"
  r = subprocess.run(main_cmd(config, workdir, END_SAVE_ONLY), env=env4, cwd=REPO,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-5000:]
  assert f"Checkpoint: restored step {saved} " in r.stderr
  step, params = read_params(workdir)
  assert step == SUB_STEPS
  assert_trees_close(params, reference_run, rtol=1e-6)

