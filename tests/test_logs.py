"""What a person reads: the warm-up of a shortened run, the ETA without the compile, the
library log lines that are filtered, and data preparation's treatment of odd folders."""

import logging
import os
import time

import numpy as np
import pytest

from structvit_jax import cli, config_utils, optim, run_log
from structvit_jax.workdir import Workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(**overrides):
  c = config_utils.import_sibling(os.path.join(REPO, "configs", "demo.py"), "demo").get_config()
  c.update(overrides)
  return c


def test_a_num_train_steps_run_leaves_its_warm_up():
  c = _demo(num_train_steps=60)  # 156 steps/epoch: 0.5 warm-up epochs would be 78 steps
  lr = np.array([optim.make_schedule(c, 60, 156)(s) for s in range(60)])
  peak = optim.scaled_lr(c)
  assert np.argmax(lr) == 3 and lr[3] == pytest.approx(peak)  # 60 * 0.5 / 10 epochs
  assert lr[-1] < 0.05 * peak                                 # and decays to the end
  # Without num_train_steps the schedule's epochs are data epochs, as before.
  full = _demo()
  sched = optim.make_schedule(full, 1560, 156)
  assert float(sched(78)) == pytest.approx(peak) and float(sched(77)) < peak


def test_eta_leaves_out_the_compile():
  p = run_log.Progress(total_steps=110, global_batch=8, first_step=0)
  time.sleep(0.3)             # "compile" of the first step
  p.add_pause(0.3)
  out = p.tick(10)
  assert out["step_time"] < 0.01 and out["eta_min"] < 0.01


def _record(path, level, msg):
  return logging.LogRecord("absl", level, path, 1, msg, ("x",), None)


def test_library_records_go_to_the_library_log_not_the_console(tmp_path):
  log = tmp_path / os.path.basename(Workdir(str(tmp_path)).library_log)
  cli.library_log.set_path(str(log))
  try:
    f = cli._LibraryNoise()
    orbax = os.path.join(os.sep, "venv", "site-packages", "orbax", "checkpoint", "m.py")
    ours = os.path.join(REPO, "structvit_jax", "checkpoint.py")
    assert not f.filter(_record(orbax, logging.INFO, "Finished saving %s"))
    assert not f.filter(_record(orbax, logging.WARNING, "Metadata file does not exist: %s"))
    assert not f.filter(_record(orbax, logging.WARNING, "Disk almost full: %s"))
    assert not f.filter(_record(orbax, logging.ERROR, "Save failed: %s"))
    assert f.filter(_record(ours, logging.INFO, "Checkpoint: saving step %s"))
    assert cli._LibraryNoise(console=True).filter(
        _record(orbax, logging.ERROR, "Read failed: %s"))
    text = log.read_text()
    assert "Disk almost full: x" in text and "Save failed: x" in text
    assert "Finished saving" not in text and "Metadata file does not exist" not in text
  finally:
    cli.library_log.set_path(None)


def test_library_tracebacks_go_to_the_log_and_to_the_console_only_if_verbose(tmp_path):
  """A failed async save (full disk): each Orbax thread logs the cause with a traceback;
  checkpoint.py reports it as one error line, the tracebacks go to WORKDIR/library.log."""
  log = tmp_path / os.path.basename(Workdir(str(tmp_path)).library_log)
  cli.library_log.set_path(str(log))
  orbax = os.path.join(os.sep, "venv", "site-packages", "orbax", "checkpoint", "m.py")
  try:
    raise OSError(28, "No space left on device")
  except OSError:
    import sys
    exc = sys.exc_info()
  try:
    for console in (False, True):
      r = logging.LogRecord("absl", logging.ERROR, orbax, 1, "Save failed: %s", ("x",), exc)
      assert cli._LibraryNoise(console=console).filter(r) == console
    assert log.read_text().count("Traceback") == 2
  finally:
    cli.library_log.set_path(None)


def _png(path):
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)


def test_prepare_reads_nested_class_folders_and_reports_loose_images(tmp_path, caplog):
  from structvit_jax.data import prepare
  _png(tmp_path / "train" / "cat" / "a.png")
  _png(tmp_path / "train" / "cat" / "indoor" / "b.png")
  _png(tmp_path / "train" / "cat" / "indoor" / "dark" / "c.png")
  _png(tmp_path / "train" / "dog" / "d.png")
  _png(tmp_path / "train" / "loose.png")
  with caplog.at_level(logging.WARNING):
    items, names = prepare.discover_image_folder(str(tmp_path))
  assert names == ["cat", "dog"]
  assert [(it.file_name, it.label) for it in items["train"]] == [
      ("cat/a.png", 0), ("cat/indoor/b.png", 0), ("cat/indoor/dark/c.png", 0), ("dog/d.png", 1)]
  assert "outside any class folder" in caplog.text and "loose.png" in caplog.text


def test_prepare_refuses_a_split_with_no_readable_image(tmp_path):
  from structvit_jax.data import prepare
  _png(tmp_path / "src" / "train" / "cat" / "a.png")
  bad = tmp_path / "src" / "validation" / "cat" / "b.jpg"
  bad.parent.mkdir(parents=True)
  bad.write_bytes(b"not an image")
  with pytest.raises(cli.UserError, match="split validation: none of its 1 image"):
    prepare.prepare("image_folder", str(tmp_path / "src"), str(tmp_path / "out"))


def test_a_missing_validation_split_names_the_flag(tmp_path, caplog):
  from etils import epath
  from structvit_jax.data import builders, prepare
  _png(tmp_path / "src" / "train" / "cat" / "a.png")
  _png(tmp_path / "src" / "train" / "dog" / "sub" / "b.png")
  with caplog.at_level(logging.WARNING):
    summary = prepare.prepare("image_folder", str(tmp_path / "src"), str(tmp_path / "out"))
  assert summary.num_examples == {"train": 2}            # the nested image included
  assert "--config.data.eval_split=" in caplog.text
  with pytest.raises(KeyError, match="--config.data.eval_split="):
    builders.open_split(epath.Path(summary.directory), "validation")
