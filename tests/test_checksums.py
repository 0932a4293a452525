"""Checkpoint checksums: the fault-injection matrix over every file of the newest step.

Restore-only, in-process: the train state of the tiny DeiT (its real tree of params,
optimiser moments, EMA, step and RNG; random values, nothing compiled) is saved at steps 5,
10 and 15 with a grain iterator, as the trainer saves it. Each case damages a copy and
restores with the trainer's fallback; the restore must return exactly the arrays and the
input position of the step it names (the newest step when the damage hit a file the restore
does not read, else an older one), with at most one warning per skipped step and no
traceback on the console. Resuming from an exact restore is exact (tests/test_faults.py
runs the full loop once, end to end, on a damaged newest step).
"""

import os
import pathlib
import shutil
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

from structvit_jax import checkpoint as ckpt_lib
from structvit_jax import checksums
from structvit_jax import cli
from structvit_jax import optim
from structvit_jax import train_state
from test_train import REPO, tiny_config

STEPS = (5, 10, 15)


def _flip(f: pathlib.Path, where: str) -> None:
  b = bytearray(f.read_bytes())
  k = min(64, len(b))
  start = {"start": 0, "middle": max(0, len(b) // 2 - k // 2), "end": len(b) - k}[where]
  for i in range(start, start + k):
    b[i] ^= 0xFF
  f.write_bytes(bytes(b))


DAMAGES = {
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "zero_length": lambda f: f.write_bytes(b""),
    "flip_start": lambda f: _flip(f, "start"),
    "flip_middle": lambda f: _flip(f, "middle"),
    "flip_end": lambda f: _flip(f, "end"),
    "garbage": lambda f: f.write_bytes(np.random.RandomState(0).bytes(
        max(64, f.stat().st_size))),
    "deleted": lambda f: f.unlink(),
}


def _iterator():
  return iter(grain.MapDataset.range(1000).to_iter_dataset())


def _abstract_state():
  config = tiny_config(**{"model.name": "deit_tiny", "model.kwargs.depth": 1})
  model = train_state.build_model(config, 10)
  schedule = optim.make_schedule(config, 20, 16)
  tx = optim.make_optimizer(config, schedule)
  return jax.eval_shape(lambda r: train_state.init_state(r, model, tx, (32, 32, 3), ema=True),
                        jax.random.PRNGKey(0))


def _random_state(abstract, seed: int):
  rng = np.random.RandomState(seed)

  def fill(a):
    if np.issubdtype(a.dtype, np.floating):
      return rng.standard_normal(a.shape).astype(a.dtype)
    return rng.randint(0, 2**31 - 1, a.shape).astype(a.dtype)
  return jax.tree.map(fill, abstract)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """checkpoints/ with steps 5, 10, 15, and each step's arrays and input position."""
  directory = tmp_path_factory.mktemp("saved") / "checkpoints"
  abstract = _abstract_state()
  ckpt = ckpt_lib.Checkpointer(str(directory))
  it, expected = _iterator(), {}
  for step in STEPS:
    for _ in range(step - (expected and max(expected) or 0)):
      next(it)
    host = _random_state(abstract, step)
    ckpt.save(step, jax.tree.map(jax.numpy.asarray, host), it)
    ckpt.wait()
    expected[step] = (host, step)  # the next element after `step` elements
  ckpt.close()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        abstract)
  return directory, target, expected


@pytest.fixture
def quiet(tmp_path, monkeypatch):
  """The command lines' console: library records and unraisable exceptions to a log file."""
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  before = list(handler.filters)
  cli.quiet_library_logs(str(tmp_path))
  yield
  handler.filters[:] = before
  cli.library_log.set_path(None)


def _restore(directory, target):
  ckpt = ckpt_lib.Checkpointer(str(directory))
  it = _iterator()
  try:
    state, step = ckpt.restore(target, data_iter=it, check=lambda s, m: None)
    return state, step, next(it)
  finally:
    ckpt.close()


def _assert_exact(state, step, position, expected):
  host, pos = expected[step]
  assert position == pos
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(host)):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=f"step {step} {path}")


def _unusable_warnings(caplog):
  return [r.getMessage() for r in caplog.records if "is unusable" in r.getMessage()]


def test_checksums_are_written_with_every_step(saved):
  directory, _, expected = saved
  for step in STEPS:
    record = ckpt_lib.read_checksums(str(directory / str(step)))
    host = expected[step][0]
    assert record["arrays"] == checksums.fingerprints(host)
    assert list(record["data_iter"]) == ["process_0-of-1.json"]


def test_fingerprints_see_one_changed_bit_and_ignore_the_layout():
  x = np.random.RandomState(1).standard_normal((64, 33)).astype(np.float32)
  y = x.copy()
  y.view(np.uint32)[17, 5] ^= 1
  sharded = jax.device_put(x, jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("d",)),
      jax.sharding.PartitionSpec("d")))
  fx = checksums.fingerprints({"a": x})["a"]
  assert checksums.fingerprints({"a": y})["a"] != fx
  assert checksums.fingerprints({"a": sharded})["a"] == fx
  for dtype in (np.int8, np.uint16, np.int32, np.bool_):
    z = np.zeros(5, dtype)
    z2 = z.copy()
    z2[3] = 1
    assert checksums.fingerprints([z]) != checksums.fingerprints([z2]), dtype


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_every_file_of_the_newest_step_damaged(damage, saved, tmp_path, caplog, capfd, quiet):
  directory, target, expected = saved
  files = sorted(p.relative_to(directory / "15") for p in (directory / "15").rglob("*")
                 if p.is_file())
  assert len(files) >= 12, files
  fell_back = []
  for i, name in enumerate(files):
    work = tmp_path / str(i) / "checkpoints"
    shutil.copytree(directory, work)
    DAMAGES[damage](work / "15" / name)
    caplog.clear()
    state, step, position = _restore(work, target)
    _assert_exact(state, step, position, expected)
    warnings = _unusable_warnings(caplog)
    if step == 15:
      assert not warnings, (name, warnings)
    else:
      fell_back.append(str(name))
      assert step == 10 and len(warnings) == 1, (name, step, warnings)
      assert "step 15 " in warnings[0]
      assert [p.name for p in work.iterdir() if ".unusable-" in p.name]
  out, err = capfd.readouterr()
  assert "Traceback" not in out + err, (out + err)[-3000:]
  # Every file that holds the arrays, their index or the checksums is detected.
  must = ["state/_METADATA", "state/manifest.ocdbt", "checksums/metadata",
          "data_iter/process_0-of-1.json"]
  must += [str(f) for f in files if str(f).startswith("state/d/")]
  biggest = max((f for f in files if "/d/" in str(f)),
                key=lambda f: (directory / "15" / f).stat().st_size)
  must.append(str(biggest))
  if damage == "flip_end":  # the last bytes of a data file are not always read
    must = [m for m in must if "/d/" not in m or m.startswith("state/d/")]
  missed = sorted(set(must) - set(fell_back))
  assert not missed, (damage, missed, fell_back)


def test_a_silently_flipped_array_is_named(saved, tmp_path, caplog, quiet):
  directory, target, expected = saved
  work = tmp_path / "checkpoints"
  shutil.copytree(directory, work)
  data = max((work / "15" / "state").glob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
  _flip(data, "middle")
  state, step, position = _restore(work, target)
  _assert_exact(state, step, position, expected)
  (warning,) = _unusable_warnings(caplog)
  assert step == 10 and "does not match its checksum" in warning and "step 15 " in warning
  assert (work / "15.unusable-checksum").is_dir()


def test_two_newest_steps_damaged(saved, tmp_path, caplog, capfd, quiet):
  directory, target, expected = saved
  work = tmp_path / "checkpoints"
  shutil.copytree(directory, work)
  for step in (15, 10):
    data = max((work / str(step) / "state").glob("ocdbt.process_0/d/*"),
               key=lambda p: p.stat().st_size)
    _flip(data, "middle")
  state, step, position = _restore(work, target)
  _assert_exact(state, step, position, expected)
  assert step == 5
  warnings = _unusable_warnings(caplog)
  assert len(warnings) == 2 and "step 15 " in warnings[0] and "step 10 " in warnings[1]
  assert "Traceback" not in "".join(capfd.readouterr())


def test_every_step_damaged_is_one_error(saved, tmp_path, caplog, capfd, quiet):
  directory, target, _ = saved
  work = tmp_path / "checkpoints"
  shutil.copytree(directory, work)
  for i, step in enumerate(STEPS):  # three kinds of damage
    state = work / str(step) / "state"
    victim = [state / "manifest.ocdbt", next(state.glob("d/*")),
              max(state.glob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)][i]
    _flip(victim, "middle")
  with pytest.raises(ckpt_lib.CheckpointError, match=r"no checkpoint in .* restores") as e:
    _restore(work, target)
  assert "\n" not in str(e.value)
  assert len(_unusable_warnings(caplog)) == 3
  assert "Traceback" not in "".join(capfd.readouterr())


def test_a_checkpoint_without_checksums_restores_unverified(saved, tmp_path, caplog, quiet):
  directory, target, expected = saved
  work = tmp_path / "checkpoints"
  shutil.copytree(directory, work)
  shutil.rmtree(work / "15" / "checksums")  # as saved before checksums were kept
  state, step, position = _restore(work, target)
  _assert_exact(state, step, position, expected)
  assert step == 15
  lines = [r.getMessage() for r in caplog.records if "unverified" in r.getMessage()]
  assert len(lines) == 1 and "step 15 " in lines[0]


def _verify(path) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "structvit_jax.checkpoint", "--verify",
                         f"--workdir={path}"], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=300)


def test_verify_command(saved, tmp_path):
  directory, _, _ = saved
  work = tmp_path / "w" / "checkpoints"
  shutil.copytree(directory, work)
  shutil.rmtree(work / "5" / "checksums")
  data = max((work / "15" / "state").glob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
  _flip(data, "middle")
  r = _verify(work.parent)
  lines = r.stdout.splitlines()
  assert r.returncode == 1, r.stdout + r.stderr
  assert lines[0].startswith("step 15: unusable: array ") and "checksum" in lines[0], lines
  assert lines[1].startswith("step 10: ok: ") and lines[2].startswith("step 5: unverified"), lines
  assert "Traceback" not in r.stdout + r.stderr and not r.stderr.strip(), r.stderr
  (work / "15").rename(work / "15.unusable-checksum")
  lines, newest_ok = ckpt_lib.verify(str(work))
  assert newest_ok and lines[0].startswith("step 10: ok"), lines
  assert "15.unusable-checksum" in lines[-1]
