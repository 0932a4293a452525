"""Every TimeSformer attention scheme trains through the real trainer: the K400 recipe
(configs/k400_timesformer.py: SGD, step schedule, drop path 0.1) on the tiny preset and the
synthetic motion clips (4 frames x 32 px, class = motion), a few steps on one device."""

import os
import re

import jax
import numpy as np
import pytest
from ml_collections.config_flags import config_flags

from structvit_jax import train
from structvit_jax.models.timesformer import ATTENTION_TYPES

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                      "k400_timesformer.py")
STEPS = 4


FAST_COMPILES = True  # XLA's cheap compile mode for this module (conftest.py)


def tiny_recipe(scheme: str):
  c = config_flags.ConfigFileFlagParser("config").parse(f"{CONFIG}:attention={scheme}")
  c.model.name = "timesformer_tiny"  # patch 8, dim 64, depth 2; grids 4 frames x 32 px
  c.model.kwargs.num_classes = 8
  c.data.name = "synthetic_video"
  c.data.image_size = 32
  c.data.num_frames = 4
  c.data.num_workers = 0
  c.data.random_flip = False       # a flip would swap 'left' and 'right'
  with c.unlocked():               # the built-in dataset's sizes (not in the recipe)
    c.data.train_examples = 64
    c.data.eval_examples = 12      # 2 eval batches of 8, the last one padded
  c.batch_size = 8
  c.num_train_steps = STEPS
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1000
  c.eval_every_epochs = 100.0      # eval at the end only
  return c


@pytest.mark.parametrize("scheme", ATTENTION_TYPES)
def test_every_scheme_trains_on_synthetic_motion(scheme, tmp_path, monkeypatch):
  config = tiny_recipe(scheme)
  assert (config.optimizer, config.schedule, config.model.kwargs.drop_path_rate) == (
      "sgd", "steps", 0.1)
  initial = {}
  orig_init = train._Setup.restore_or_init

  def init(self, *args):  # a host copy of the initial parameters (train_fn donates them)
    state = orig_init(self, *args)
    initial["params"] = jax.device_get(state.params)
    return state

  monkeypatch.setattr(train._Setup, "restore_or_init", init)
  state, ev = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert int(jax.device_get(state.step)) == STEPS  # the trainer raises on a non-finite loss
  final = jax.device_get(state.params)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), initial["params"], final)
  flat = jax.tree_util.tree_flatten_with_path(changed)[0]
  unchanged = {jax.tree_util.keystr(p) for p, c in flat if not c}
  # The pre-stages (temporal / width / local) feed a zero-initialised `*_fc`: no gradient
  # reaches them in step 1, later ones are second order (~1e-8 on the norm bias measured),
  # which rounds away against a norm scale of 1.0 in float32. Their biases must move.
  stuck = {s for s in unchanged if not re.fullmatch(
      r"\['blocks_\d+'\]\['(temporal|width|local)_norm1'\]\['scale'\]", s)}
  assert not stuck, f"{scheme}: parameters not updated: {sorted(stuck)}"
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final))
  assert ev["eval/count"] == 12
  assert np.isfinite(ev["eval/loss"]) and 0 <= ev["eval/top1"] <= ev["eval/top5"] <= 1
