"""Fault injection: damaged checkpoints, resumes with another config, a run killed in its
final evaluation, a killed trainer's input workers, a full disk.

One uninterrupted reference run (tiny model, 1 device, checkpoints at 10, 15, 20) is shared
by the module; each damage case works on a copy of its workdir, and every rerun must end
with the reference's final evaluation.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import psutil
import pytest

from structvit_jax import checkpoint as ckpt_lib
from structvit_jax import export as export_lib
from structvit_jax import paths, run_log
from structvit_jax import config_checks
from structvit_jax import train
from structvit_jax import train_state
from test_train import REPO, tiny_config, write_config_file

FAST_COMPILES = True  # XLA's cheap compile mode for this module (conftest.py)

FIELDS = {"num_train_steps": 20, "checkpoint_every_steps": 5, "keep_checkpoints": 3,
          "model.name": "deit_tiny"}  # DeiT (no BatchNorm) compiles fastest


def config(**overrides):
  return tiny_config(**{**FIELDS, **overrides})


def run(workdir, **overrides):
  return train.train_and_evaluate(config(**overrides), str(workdir), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """Every rerun builds new jitted functions: a persistent cache compiles each program once."""
  from jax._src import compilation_cache
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  previous = {k: getattr(jax.config, k) for k in keys}
  for k, v in zip(keys, (str(tmp_path_factory.mktemp("jax_cache")), 0.0, -1)):
    jax.config.update(k, v)
  compilation_cache.reset_cache()
  yield
  for k, v in previous.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, compile_cache):
  workdir = tmp_path_factory.mktemp("reference")
  _, ev = run(workdir)
  assert ckpt_lib.list_steps(str(workdir / "checkpoints")) == [10, 15, 20]
  return workdir, ev


def copy_run(reference, dst: pathlib.Path) -> pathlib.Path:
  """The reference's checkpoints and config.json, without its eval records."""
  src, _ = reference
  shutil.copytree(src / "checkpoints", dst / "checkpoints")
  shutil.copy(src / "config.json", dst / "config.json")
  return dst


def largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = list((step_dir / "state").glob("ocdbt.process_0/d/*"))
  return max(files, key=lambda p: p.stat().st_size)


def truncate(ck):
  f = largest_array_file(ck / "20")
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def byte_flip(ck):
  # A flip in the header of the data file fails Orbax's read; one inside the array data
  # restores and fails its checksum (test_silently_flipped_array_falls_back_end_to_end).
  f = largest_array_file(ck / "20")
  b = bytearray(f.read_bytes())
  b[8] ^= 0xFF
  f.write_bytes(bytes(b))


def strip_arrays(ck):
  for f in (ck / "20" / "state").rglob("d/*"):
    f.unlink()


DAMAGES = {
    # name: (damage(checkpoints dir), unusable step, its tag, step resumed from)
    "truncate": (truncate, 20, "unreadable", 15),
    "byte_flip": (byte_flip, 20, "unreadable", 15),
    "delete_metadata": (lambda ck: (ck / "20/state/_METADATA").unlink(), 20, "no-metadata", 15),
    "delete_manifest": (lambda ck: (ck / "20/state/manifest.ocdbt").unlink(), 20,
                        "no-manifest", 15),
    "delete_data_iter": (lambda ck: (ck / "20/data_iter/process_0-of-1.json").unlink(), 20,
                         "no-data-iter", 15),
    "empty_step_dir": (lambda ck: (ck / "30").mkdir(), 30, "empty", 20),
    "stripped_step_dir": (strip_arrays, 20, "no-arrays", 15),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_damaged_newest_checkpoint_falls_back(name, reference, tmp_path, caplog):
  damage, bad, tag, resumed = DAMAGES[name]
  workdir = copy_run(reference, tmp_path / "w")
  ck = workdir / "checkpoints"
  damage(ck)
  caplog.set_level("INFO")
  _, ev = run(workdir)
  # Same final evaluation as the uninterrupted run (exact resume from the older step).
  for k in ("eval/loss", "eval/top1", "eval_ema/top1"):
    np.testing.assert_allclose(ev[k], reference[1][k], rtol=1e-6)
  warnings = [r.getMessage() for r in caplog.records if "is unusable" in r.getMessage()]
  assert len(warnings) == 1 and f"step {bad} " in warnings[0], warnings
  assert f"Checkpoint: restored step {resumed} " in caplog.text
  # The damaged step is kept (renamed), out of Orbax's step listing.
  assert (ck / f"{bad}.unusable-{tag}").is_dir()
  assert ckpt_lib.list_steps(str(ck))[-1] == 20


def test_silently_flipped_array_falls_back_end_to_end(reference, tmp_path):
  """The one end-to-end run of the checksum matrix (tests/test_checksums.py checks every file
  and damage restore-only): 64 bytes flipped in the middle of the newest step's largest
  array file restore without an error from Orbax; the checksums catch it, the run resumes
  from step 15 and ends with the reference's final evaluation, exit 0, no traceback."""
  workdir = copy_run(reference, tmp_path / "w")
  _flip_middle(largest_array_file(workdir / "checkpoints" / "20"))
  cfg = write_config_file(tmp_path / "cfg.py", **FIELDS)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  r = subprocess.run([sys.executable, "-m", "structvit_jax.main", f"--config={cfg}",
                      f"--workdir={workdir}"], env=env, cwd=REPO, capture_output=True,
                     text=True, timeout=600)
  console = r.stdout + r.stderr
  assert r.returncode == 0, console[-5000:]
  assert "Traceback" not in console, console[-5000:]
  unusable = [line for line in console.splitlines() if "is unusable" in line]
  assert len(unusable) == 1 and "step 20 " in unusable[0], unusable
  assert "does not match its checksum" in unusable[0], unusable
  assert "restored step 15 " in console
  (last,) = [e for e in run_log.read_eval_records(str(workdir)) if e["step"] == 20]
  for k in ("eval/loss", "eval/top1", "eval_ema/loss", "eval_ema/top1"):
    np.testing.assert_allclose(last[k], reference[1][k], rtol=1e-6)
  assert (workdir / "checkpoints" / "20.unusable-checksum").is_dir()


def test_non_finite_evaluation_is_one_error_and_not_recorded(tmp_path, monkeypatch):
  writer = run_log.MetricWriter(str(tmp_path))
  monkeypatch.setattr(train_state, "run_eval", lambda *a, **k: {"loss": float("nan"), "top1": 0.5, "top5": 1.0, "count": 8})

  class Setup:
    eval_fn = eval_inp = mesh = None
    new_evaluator = staticmethod(lambda: None)

  class State:
    params = batch_stats = ema_params = None

  try:
    with pytest.raises(FloatingPointError, match=r"step 7: eval/loss=nan") as e:
      train._eval_and_log(Setup(), State(), config(ema_decay=0.0), writer, 7)
  finally:
    writer.close()
  assert "\n" not in str(e.value) and "not recorded" in str(e.value)
  assert run_log.read_eval_records(str(tmp_path)) == []
  from structvit_jax import cli
  assert cli.classify(e.value)[0] == 1


def test_finished_run_without_final_eval_evaluates_on_restart(reference, tmp_path):
  workdir = copy_run(reference, tmp_path / "w")  # killed during its final evaluation
  _, ev = run(workdir)
  np.testing.assert_allclose(ev["eval/top1"], reference[1]["eval/top1"], rtol=1e-6)
  records = run_log.read_eval_records(str(workdir))
  assert [r["step"] for r in records] == [20]


def test_resume_with_another_model_is_refused_before_config_json_changes(reference, tmp_path):
  workdir = copy_run(reference, tmp_path / "w")
  before = (workdir / "config.json").read_bytes()
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    run(workdir, **{"model.name": "structvit_tiny"})
  msg = str(e.value)
  assert "\n" not in msg and "deit_tiny" in msg and "structvit_tiny" in msg
  assert "model.name" in msg
  assert (workdir / "config.json").read_bytes() == before
  # Without config.json (a run from before it was written) the arrays tell the mismatch.
  (workdir / "config.json").unlink()
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="structvit_tiny"):
    run(workdir, **{"model.name": "structvit_tiny"})
  assert not (workdir / "config.json").exists()
  assert ckpt_lib.list_steps(str(workdir / "checkpoints")) == [10, 15, 20]


def test_export_refuses_weights_of_another_model(reference, tmp_path):
  workdir = copy_run(reference, tmp_path / "w")
  recorded = json.loads((workdir / "config.json").read_text())
  recorded["model"]["name"] = "structvit_tiny"
  (workdir / "config.json").write_text(json.dumps(recorded))
  with pytest.raises(export_lib.ExportError, match="does not fit the recorded model"):
    export_lib.export(str(workdir), str(tmp_path / "export"))


def test_export_names_an_unusable_step_and_the_step_to_use(reference, tmp_path):
  workdir = copy_run(reference, tmp_path / "w")
  (workdir / "checkpoints/20/state/_METADATA").unlink()
  with pytest.raises(export_lib.ExportError, match=r"step 20 .* --step=15"):
    export_lib.export(str(workdir), str(tmp_path / "export"))
  assert "step 15" in export_lib.export(str(workdir), str(tmp_path / "export"), step=15)


def _flip_middle(f: pathlib.Path) -> None:
  b = bytearray(f.read_bytes())
  mid = len(b) // 2 - 32
  b[mid:mid + 64] = bytes(x ^ 0xFF for x in b[mid:mid + 64])
  f.write_bytes(bytes(b))


def test_export_and_init_from_check_the_checksums(reference, tmp_path):
  from structvit_jax import inference, weights
  workdir = copy_run(reference, tmp_path / "w")
  _flip_middle(largest_array_file(workdir / "checkpoints" / "20"))
  with pytest.raises(export_lib.ExportError,
                     match=r"step 20 .* does not match its checksum.*--step=15"):
    export_lib.export(str(workdir), str(tmp_path / "export"))
  # init_from takes the newest usable step (15): its params, as an export of step 15 has.
  out = tmp_path / "export"
  export_lib.export(str(workdir), str(out), step=15, use_ema=False)
  got, want = weights.load_source(str(workdir)), weights.load_source(str(out))
  assert got.keys() == want.keys()
  for k in got:
    np.testing.assert_array_equal(got[k], want[k])
  # An export carries checksums.json: verify checks it, a damaged export is one error.
  lines, ok = ckpt_lib.verify(str(out))
  assert ok and lines[0].startswith(f"export {out}: ok: "), lines
  _flip_middle(max(out.glob("params/ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size))
  lines, ok = ckpt_lib.verify(str(out))
  assert not ok and "unusable" in lines[0], lines
  with pytest.raises(ckpt_lib.CheckpointError, match="unusable"):
    inference.load(str(out))


def test_resume_with_another_batch_size_is_refused(reference, tmp_path):
  workdir = copy_run(reference, tmp_path / "w")
  before = (workdir / "config.json").read_bytes()
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"batch_size: 16 -> 32"):
    run(workdir, batch_size=32)
  assert (workdir / "config.json").read_bytes() == before


def test_resume_may_change_the_listed_fields(reference):
  recorded = json.loads((reference[0] / "config.json").read_text())
  changed = config(log_every_steps=7, eval_every_epochs=3.0, keep_checkpoints=9,
                   checkpoint_every_steps=4, **{"data.num_workers": 2})
  assert config_checks.config_changes(recorded, changed) == []
  assert config_checks.config_changes(recorded, config(lr=1.0)) == ["lr: 0.001 -> 1.0"]


def test_orbax_tmp_leftovers_are_removed_at_start(reference, tmp_path):
  workdir = copy_run(reference, tmp_path / "w")
  tmp = workdir / "checkpoints" / "25.orbax-checkpoint-tmp-1234"
  shutil.copytree(workdir / "checkpoints/20", tmp)
  run(workdir)
  assert not tmp.exists()


# ----------------------------------------------------------------------------- disk full


def _mount_tmpfs(path: pathlib.Path, size: str) -> None:
  path.mkdir(parents=True, exist_ok=True)
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                     capture_output=True, text=True)
  if r.returncode:
    pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {r.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
  mounts = []

  def mount(size: str) -> pathlib.Path:
    path = tmp_path / f"disk{len(mounts)}"
    _mount_tmpfs(path, size)
    mounts.append(path)
    return path

  yield mount
  for m in mounts:
    subprocess.run(["umount", "-l", str(m)], check=False)  # lazy: Orbax may hold a file


def test_full_disk_at_start_leaves_no_empty_config_json(reference, small_disk):
  disk = small_disk("64k")
  fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
  try:  # fill every block
    while True:
      os.write(fd, b"\0" * 4096)
  except OSError:
    pass
  finally:
    os.close(fd)
  with pytest.raises(OSError) as e:
    paths.write_atomic(str(disk / "config.json"), "{}" * 10000)
  assert str(disk / "config.json") in str(e.value) and "No space left" in str(e.value)
  assert not (disk / "config.json").exists()
  assert [p.name for p in disk.iterdir()] == ["filler"]


def test_failed_async_save_is_one_error_naming_path_and_cause(reference, small_disk):
  ref_ck = reference[0] / "checkpoints" / "10"
  size = sum(f.stat().st_size for f in ref_ck.rglob("*") if f.is_file())
  # Room for one checkpoint (and the run's small files), not for two.
  disk = small_disk(f"{int(size * 1.6) // 4096 * 4096}")
  workdir = disk / "w"
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    run(workdir, checkpoint_every_steps=10, keep_checkpoints=3)
  msg = str(e.value)
  assert "\n" not in msg and "No space left on device" in msg
  assert str(workdir / "checkpoints" / "20") in msg and "step 10" in msg
  assert ckpt_lib.list_steps(str(workdir / "checkpoints")) == [10]
  assert json.loads((workdir / "config.json").read_text())["batch_size"] == 16
  # The last good checkpoint is intact: it restores.
  state = ckpt_lib.state_metadata(str(workdir / "checkpoints/10/state"))
  assert "params" in state


# ----------------------------------------------------------------------------- workers


def test_input_workers_exit_when_the_trainer_is_killed(tmp_path):
  cfg = write_config_file(tmp_path / "cfg.py", **{"data.num_workers": 2,
                                                  "num_train_steps": 100000,
                                                  "checkpoint_every_steps": 100000})
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  log = tmp_path / "log"
  with open(log, "w") as out:
    p = subprocess.Popen([sys.executable, "-m", "structvit_jax.main", f"--config={cfg}",
                          f"--workdir={tmp_path / 'w'}"], env=env, cwd=REPO,
                         stdout=out, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
      if "step 5/" in log.read_text():  # training, batches coming from the workers
        break
      time.sleep(0.2)
    assert p.poll() is None, log.read_text()[-3000:]
    children = psutil.Process(p.pid).children(recursive=True)
    workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) >= 2, [" ".join(c.cmdline())[:200] for c in children]
    p.send_signal(signal.SIGKILL)
    p.wait()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [" ".join(c.cmdline())[:200] for c in alive]
  finally:
    if p.poll() is None:
      p.kill()


def test_resume_of_a_run_older_than_a_field_keeps_the_value_it_trained_with(reference,
                                                                             tmp_path):
  # weight_decay_mask came after runs that decayed without the position-encoding convs: a
  # recipe default of 'timm' must not change such a run's optimiser on resume.
  workdir = copy_run(reference, tmp_path / "w")
  recorded = json.loads((workdir / "config.json").read_text())
  recorded.pop("weight_decay_mask")
  (workdir / "config.json").write_text(json.dumps(recorded))
  c = config(weight_decay_mask="timm")
  config_checks.check_resume_config(c, str(workdir))
  assert c.weight_decay_mask == config_checks.RESUME_LEGACY_VALUES["weight_decay_mask"]
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="weight_decay_mask"):
    config_checks.check_resume_config(config(weight_decay_mask="timm"), str(reference[0]))  # recorded
