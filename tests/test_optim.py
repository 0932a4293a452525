"""Optimiser pieces, mixup/cutmix and sharding rules (no model compile: fast)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from structvit_jax import mixup, optim, sharding


def _config(**kw) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(
      lr=1e-3, batch_size=512, lr_base_batch_size=1024, warmup_lr=1e-6, min_lr=1e-5,
      warmup_epochs=5.0, schedule="cosine", lr_step_epochs=(), lr_step_factor=0.1,
      optimizer="adamw", weight_decay=0.05, momentum=0.9, grad_clip_norm=0.0))
  c.update(kw)
  return c


def test_decay_mask_excludes_norms_biases_1d_pos_embed_tokens():
  params = {
      "blocks1_0": {"conv1": {"kernel": jnp.ones((1, 1, 8, 8)), "bias": jnp.ones(8)},
                    "norm1": {"scale": jnp.ones(8), "bias": jnp.ones(8)},
                    "pos_embed": {"kernel": jnp.ones((3, 3, 1, 8)), "bias": jnp.ones(8)},
                    "gamma_1": jnp.ones(8)},
      "cls_token": jnp.ones((1, 1, 8)),
      "pos_embed": jnp.ones((1, 5, 8)),
      "head": {"kernel": jnp.ones((8, 10)), "bias": jnp.ones(10)},
  }
  mask = optim.decay_mask(params)
  assert mask["blocks1_0"]["conv1"] == {"kernel": True, "bias": False}
  assert mask["blocks1_0"]["norm1"] == {"scale": False, "bias": False}
  assert mask["blocks1_0"]["pos_embed"] == {"kernel": False, "bias": False}
  assert mask["blocks1_0"]["gamma_1"] is False
  assert mask["cls_token"] is False and mask["pos_embed"] is False
  assert mask["head"] == {"kernel": True, "bias": False}


def test_weight_decay_applies_only_where_masked():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  tx = optim.make_optimizer(_config(weight_decay=0.5), optax.constant_schedule(0.1))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["b"], 0.0)


def test_cosine_schedule_with_warmup_and_lr_scaling():
  c = _config()
  assert optim.scaled_lr(c) == pytest.approx(5e-4)
  sched = optim.make_schedule(c, total_steps=100, steps_per_epoch=2)  # 10 warm-up steps
  assert float(sched(0)) == pytest.approx(1e-6, rel=1e-4)
  assert float(sched(10)) == pytest.approx(5e-4, rel=1e-5)
  assert float(sched(5)) == pytest.approx((1e-6 + 5e-4) / 2, rel=1e-4)
  assert float(sched(100)) == pytest.approx(1e-5, rel=1e-4)
  assert float(sched(55)) < float(sched(30))


def test_step_schedule():
  c = _config(schedule="steps", lr_step_epochs=(20.0, 40.0), warmup_epochs=0.0,
              batch_size=1024)
  sched = optim.make_schedule(c, total_steps=100, steps_per_epoch=1)
  assert [float(sched(s)) for s in (1, 19, 21, 41)] == pytest.approx(
      [1e-3, 1e-3, 1e-4, 1e-5], rel=1e-5)


def test_ema_update():
  out = optim.ema_update({"a": jnp.zeros(3)}, {"a": jnp.ones(3)}, 0.9)
  np.testing.assert_allclose(out["a"], 0.1, rtol=1e-6)


def test_label_smoothing_only():
  x = jnp.ones((4, 8, 8, 3))
  y = jnp.array([0, 1, 2, 3])
  out, t = mixup.mixup_cutmix(jax.random.PRNGKey(0), x, y, 10, mixup_alpha=0.0,
                              cutmix_alpha=0.0, label_smoothing=0.1)
  assert out is x
  np.testing.assert_allclose(t[0, 0], 0.9 + 0.01, rtol=1e-6)
  np.testing.assert_allclose(t[0, 1], 0.01, rtol=1e-6)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_mixup_cutmix_targets_match_pixels(seed):
  """Whichever of mixup/cutmix is drawn, each image is lam * x + (1-lam) * flip(x) in
  pixel mass, and the target carries the same lam (timm semantics, corrected lam)."""
  b, h, w = 4, 16, 16
  x = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None] + 1,
                       (b, h, w, 3))
  y = jnp.arange(b)
  out, t = mixup.mixup_cutmix(jax.random.PRNGKey(seed), x, y, 10, mixup_alpha=0.8,
                              cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.0)
  lam = float(t[0, 0])
  assert 0.0 <= lam <= 1.0
  np.testing.assert_allclose(float(t[0, b - 1]), 1 - lam, atol=1e-6)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
  # Image 0 is made of values 1 (itself) and b (its flipped partner): mean gives lam.
  mean = float(out[0].mean())
  np.testing.assert_allclose(mean, lam * 1 + (1 - lam) * b, rtol=1e-5)


def test_mixup_cutmix_video_box_covers_all_frames():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 8, 8, 3))
  out, _ = mixup.mixup_cutmix(jax.random.PRNGKey(2), x, jnp.array([0, 1]), 4,
                              mixup_alpha=0.0, cutmix_alpha=1.0)
  changed = np.asarray(out != x).any(-1)          # [B, T, H, W]
  assert (changed == changed[:, :1]).all()        # the same box in every frame


def test_fsdp_spec():
  P = jax.sharding.PartitionSpec
  assert sharding.fsdp_spec((64, 192), 8) == P(None, "data")
  assert sharding.fsdp_spec((16,), 8) == P("data")
  assert sharding.fsdp_spec((3, 5), 8) == P()
  assert sharding.fsdp_spec((), 8) == P()
  assert sharding.fsdp_spec((64, 64), 1) == P()
