"""gs:// workdirs against a real Cloud Storage emulator (fake-gcs-server, tests/gcs_emulator.py).

One run on gs://bkt/run (tiny DeiT, 1 device, checkpoints every 5 of 20 steps) is SIGKILLed
with its step-15 save in flight, resumed to the end in a new process, exported to gs:// and
loaded back; the module's other tests work on what it left. Skipped, saying why, only when
the emulator cannot start.
"""

import json
import os
import re
import signal
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from structvit_jax import checkpoint as ckpt_lib
from structvit_jax import cli
from structvit_jax import config_checks
from structvit_jax import export as export_lib
from structvit_jax import inference
from structvit_jax import main as main_lib
from structvit_jax import paths
from structvit_jax import weights
import gcs_emulator
from test_train import REPO, tiny_config, write_config_file

FIELDS = {"model.name": "deit_tiny", "num_train_steps": 20, "checkpoint_every_steps": 5,
          "keep_checkpoints": 3, "log_every_steps": 5}
WORKDIR = "gs://bkt/run"
KILL_AT = 15

# The trainer of `python -m structvit_jax.main`, killed (SIGKILL) right after it starts the
# async save of step KILL_AT: the steps before it are committed (each save waits for the
# previous one), that one is not, or only partly.
KILLED_MAIN = f"""
import os, signal
from structvit_jax import checkpoint, cli, config_checks, main
save = checkpoint.Checkpointer.save
def save_then_die(self, step, state, data_iter=None):
  save(self, step, state, data_iter)
  if step == {KILL_AT}:
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = save_then_die
cli.run(main.main, check_argv=config_checks.check_config_argv)
"""


@pytest.fixture(scope="module")
def gcs():
  """The emulator with bucket 'bkt', and this process's environment pointed at it."""
  try:
    server = gcs_emulator.Emulator()
    server.create_bucket("bkt")
  except (RuntimeError, OSError) as e:
    pytest.skip(f"the GCS emulator (fake-gcs-server) cannot start: {e}")
  with pytest.MonkeyPatch.context() as mp:
    for k, v in server.env.items():
      mp.setenv(k, v)
    yield server
  server.stop()


@pytest.fixture(scope="module")
def run(gcs, tmp_path_factory):
  """Trains on gs://bkt/run, is killed, resumes to the end; returns the resumed run's log."""
  tmp = tmp_path_factory.mktemp("gcs_run")
  config = write_config_file(tmp / "tiny.py", **FIELDS)
  (tmp / "killed_main.py").write_text(KILLED_MAIN)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  env.pop("XLA_FLAGS", None)  # one device
  args = [f"--config={config}", f"--workdir={WORKDIR}"]
  killed = subprocess.run([sys.executable, str(tmp / "killed_main.py"), *args], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-5000:]
  steps = ckpt_lib.list_steps(f"{WORKDIR}/checkpoints")
  assert 10 in steps and set(steps) <= {5, 10, 15}, steps
  assert paths.isfile(f"{WORKDIR}/checkpoints/10/data_iter/process_0-of-1.json")
  assert json.loads(paths.read_text(f"{WORKDIR}/config.json"))["num_train_steps"] == 20
  resumed = subprocess.run([sys.executable, "-m", "structvit_jax.main", *args], env=env,
                           cwd=REPO, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-5000:]
  paths.forget_listings(WORKDIR)  # this process listed the bucket before the resume wrote
  return resumed.stderr


def _event_scalars(data: bytes) -> dict[str, list[int]]:
  """tag -> steps of the scalars in a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  out, i = {}, 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    i += 12 + n + 4
    for v in event.summary.value:
      out.setdefault(v.tag, []).append(event.step)
  return out


def test_killed_run_resumes_to_the_end(run):
  assert re.search(rf"restored step (10|15) from {WORKDIR}/checkpoints", run), run[-3000:]
  assert ckpt_lib.list_steps(f"{WORKDIR}/checkpoints") == [10, 15, 20]
  records = json.loads("[" + ",".join(paths.read_text(f"{WORKDIR}/eval_results.jsonl")
                                      .splitlines()) + "]")
  assert [r["step"] for r in records] == [20] and records[0]["eval/count"] == 40
  events = [n for n in paths.listdir(f"{WORKDIR}/tensorboard") if "tfevents" in n]
  assert events, paths.listdir(WORKDIR)
  scalars = {}
  for name in events:
    for tag, steps in _event_scalars(
        paths.epath(f"{WORKDIR}/tensorboard/{name}").read_bytes()).items():
      scalars.setdefault(tag, []).extend(steps)
  assert 20 in scalars["train/loss"] and scalars["eval/top1"] == [20], scalars.keys()
  # Nothing left behind: the write probes of check_workdir are deleted.
  assert not [n for n in paths.listdir(WORKDIR) if n.startswith(".write_test")]


def test_export_to_and_from_gcs_loads_back(run, tmp_path):
  summary = export_lib.export(WORKDIR, "gs://bkt/export")
  assert "step 20" in summary and "EMA" in summary
  local = str(tmp_path / "export")
  export_lib.export(WORKDIR, local)
  remote, here = inference.load("gs://bkt/export"), inference.load(local)
  # model.json records how long each serving artefact took to write and its size (the
  # serialised StableHLO carries a few bytes of trace-location text that vary): the rest is
  # the same.
  untimed = lambda meta: {**meta, "serving": {k: {f: v for f, v in s.items() if f not in ("seconds", "bytes")}  # noqa: E731
                                              for k, s in meta.get("serving", {}).items()}}
  assert untimed(remote.meta) == untimed(here.meta)
  assert remote.meta["source"] == f"{WORKDIR}@20 (EMA)"
  jax.tree.map(np.testing.assert_array_equal, remote.variables, here.variables)
  x = np.random.default_rng(0).normal(size=(2, *remote.input_shape)).astype(np.float32)
  logits = remote.logits(x)
  assert logits.shape == (2, 10) and np.isfinite(logits).all()
  np.testing.assert_array_equal(logits, here.logits(x))


def test_init_from_gcs_export_and_workdir(run, tmp_path):
  if not paths.isfile("gs://bkt/export/model.json"):
    export_lib.export(WORKDIR, "gs://bkt/export")
  raw = str(tmp_path / "raw")
  export_lib.export(WORKDIR, raw, use_ema=False)
  # A workdir: its newest checkpoint's params (not the EMA), as from the local export.
  from_run = weights.load_source(WORKDIR)
  jax.tree.map(np.testing.assert_array_equal, from_run, weights.load_source(raw))
  # An export, through config.init_from's entry point.
  exported = inference.load("gs://bkt/export").variables
  abstract = {"params": exported["params"], "batch_stats": {}}
  got = weights.init_variables_from("gs://bkt/export", abstract, init_fn=None)
  jax.tree.map(np.testing.assert_array_equal, got["params"], exported["params"])


def test_damaged_newest_step_is_moved_aside_on_gcs(run):
  ckdir = f"{WORKDIR}/checkpoints"
  paths.remove(f"{ckdir}/20/state/manifest.ocdbt")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta = ckpt_lib.state_metadata(f"{ckdir}/15/state")
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          meta)
  ckpt = ckpt_lib.Checkpointer(ckdir)
  try:
    state, step = ckpt.restore(abstract, check=lambda s, m: None)
  finally:
    ckpt.close()
  assert step == 15 and "params" in state
  assert ckpt_lib.list_steps(ckdir) == [10, 15]
  assert "20.unusable-no-manifest" in paths.listdir(ckdir)
  assert paths.isfile(f"{ckdir}/20.unusable-no-manifest/state/_METADATA")


def test_flipped_array_bytes_on_gcs_fail_their_checksum(run):
  """Checksums on gs://: 64 bytes flipped in the middle of the newest step's largest array
  object; `verify` names the step unusable, a restore falls back to the step before."""
  ckdir = f"{WORKDIR}/checkpoints"
  newest, older = ckpt_lib.list_steps(ckdir)[-2:][::-1]
  objects = [p for p in paths.epath(f"{ckdir}/{newest}/state/ocdbt.process_0/d").iterdir()]
  target = max(objects, key=lambda p: len(p.read_bytes()))
  b = bytearray(target.read_bytes())
  mid = len(b) // 2 - 32
  b[mid:mid + 64] = bytes(x ^ 0xFF for x in b[mid:mid + 64])
  target.write_bytes(bytes(b))
  lines, newest_ok = ckpt_lib.verify(WORKDIR)
  assert not newest_ok and lines[0].startswith(f"step {newest}: unusable"), lines
  assert lines[1] == f"step {older}: ok: " + lines[1].split(": ok: ")[1], lines
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          ckpt_lib.state_metadata(f"{ckdir}/{older}/state"))
  ckpt = ckpt_lib.Checkpointer(ckdir)
  try:
    _, step = ckpt.restore(abstract, check=lambda s, m: None)
  finally:
    ckpt.close()
  assert step == older


def test_workdir_and_data_dir_urls_are_checked(gcs):
  main_lib.check_workdir("gs://bkt/fresh")  # writable: nothing raised, nothing left
  assert not paths.isdir("gs://bkt/fresh")
  for bad, message in (("gs://no-such-bucket/run", "not writable"),
                       ("s3://bkt/run", "must be gs://"), ("gs://", "must be gs://")):
    with pytest.raises(cli.UserError, match=message):
      main_lib.check_workdir(bad)
  with pytest.raises(cli.UserError, match="local disk or a mount"):
    config_checks.check_config(tiny_config(**{"data.data_dir": "gs://bkt/tfds"}))
