"""Trainer performance plumbing: the step dispatch runs under a transfer guard (no hidden
host syncs) and the progress line reports how long the loop waited for data."""

import jax
import numpy as np
import pytest

from structvit_jax import run_log
from structvit_jax import train
from test_train import tiny_config

STEPS = dict(num_train_steps=3, log_every_steps=3, checkpoint_every_steps=100,
             **{"data.eval_examples": 16})


FAST_COMPILES = True  # XLA's cheap compile mode for this module (conftest.py)


def _wrap_dispatch(monkeypatch, wrapper):
  """Replaces the jitted train_fn the loop dispatches by wrapper(train_fn)."""
  orig_init = train._Setup.__init__

  def init(self, *args, **kwargs):
    orig_init(self, *args, **kwargs)
    jitted = self.train_fn
    self.train_fn = wrapper(jitted)
    self.train_fn.lower = jitted.lower  # a fresh start compiles the step ahead of its call

  monkeypatch.setattr(train._Setup, "__init__", init)


def test_step_dispatch_runs_under_the_transfer_guard(tmp_path, monkeypatch):
  config = tiny_config(**STEPS)
  assert config.transfer_guard == "disallow"  # the default
  seen = []

  def record(fn):
    def step(state, batch):
      seen.append((jax.config.jax_transfer_guard_device_to_host,
                   jax.config.jax_transfer_guard_host_to_device))
      return fn(state, batch)
    return step

  _wrap_dispatch(monkeypatch, record)
  lines = []
  monkeypatch.setattr(run_log, "log_console", lines.append)
  # structvit_tiny: depthwise convs, StructSA and BatchNorm all trace under the guard.
  state, _ = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert int(state.step) == 3
  assert seen == [("disallow", "disallow")] * 3
  progress = [l for l in lines if "ms/step" in l]
  assert progress and "data_wait" in progress[-1], lines
  print(progress[-1])


def test_host_round_trip_in_the_step_raises(tmp_path, monkeypatch):
  # On CPU device memory is host memory, so only the host->device half of a round trip is
  # a transfer the guard sees (on GPU/TPU the device->host read raises first).
  def round_trip(fn):
    return lambda state, batch: fn(state, jax.tree.map(np.asarray, batch))

  _wrap_dispatch(monkeypatch, round_trip)
  config = tiny_config(**STEPS, **{"model.name": "deit_tiny"})  # fastest compile
  with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])


def test_progress_data_wait_fraction(monkeypatch):
  clock = iter([0.0, 10.0])
  monkeypatch.setattr(run_log.time, "perf_counter", lambda: next(clock))
  p = run_log.Progress(total_steps=10, global_batch=8, first_step=0)
  p.add_data_time(1.5)
  p.add_data_time(1.0)
  m = p.tick(5)
  assert m["data_wait"] == pytest.approx(0.25) and m["step_time"] == pytest.approx(2.0)
  line = run_log.console_line(5, 10, dict(m, loss=1.0, top1=0.5, top5=0.9, lr=1e-3,
                                              grad_norm=1.0))
  assert "data_wait 25%" in line
