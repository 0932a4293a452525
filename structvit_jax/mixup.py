"""Mixup / CutMix on device with timm's per-batch semantics (as used by DeiT).

One lambda per global batch; with both enabled, CutMix is picked with probability
`switch_prob`; each example is mixed with the batch flipped along its first axis; CutMix's
lambda is corrected to the real box area; label smoothing is folded into the soft targets.
Runs inside the jitted step on the global batch, so the result does not depend on the
number of devices.
"""

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mix_params(rng: jax.Array, h: int, w: int, *, mixup_alpha: float, cutmix_alpha: float,
               switch_prob: float = 0.5) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One batch's draw: (use_cutmix bool, the CutMix box as a bool [H, W] mask, lam: the
  weight of the unflipped batch, CutMix's corrected to the real box area). Only valid
  when one of the alphas is > 0."""
  k_switch, k_mix, k_cut, k_cy, k_cx = jax.random.split(rng, 5)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  a_mix, a_cut = max(mixup_alpha, 1e-3), max(cutmix_alpha, 1e-3)  # unused when 0
  lam_mix = jax.random.beta(k_mix, a_mix, a_mix)
  lam_cut = jax.random.beta(k_cut, a_cut, a_cut)

  # CutMix box (timm rand_bbox): side ratio sqrt(1 - lam), centre uniform, clipped.
  ratio = jnp.sqrt(1.0 - lam_cut)
  cut_h = (h * ratio).astype(jnp.int32)
  cut_w = (w * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_cy, (), 0, h)
  cx = jax.random.randint(k_cx, (), 0, w)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
  ys = jnp.arange(h)[:, None]
  xs = jnp.arange(w)[None, :]
  box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)          # [H, W]
  lam_box = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
  return use_cutmix, box, jnp.where(use_cutmix, lam_box, lam_mix)


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, *,
                 mixup_alpha: float, cutmix_alpha: float, switch_prob: float = 0.5,
                 label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Returns (mixed images, soft targets [B, num_classes]).

  images: [B, ..., H, W, C] (images or clips; the CutMix box covers all frames).
  """
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  use_cutmix, box, lam = mix_params(rng, images.shape[-3], images.shape[-2],
                                    mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                                    switch_prob=switch_prob)
  return mix_images(images, use_cutmix, box, lam), targets * lam + targets[::-1] * (1.0 - lam)


def mix_images(images: jax.Array, use_cutmix: jax.Array, box: jax.Array, lam: jax.Array
               ) -> jax.Array:
  """The batch mixed with itself flipped along its first axis (mix_params' draw)."""
  flipped = images[::-1]
  cut = jnp.where(box[:, :, None], flipped, images)
  mixed = images * lam.astype(images.dtype) + flipped * (1 - lam).astype(images.dtype)
  return jnp.where(use_cutmix, cut, mixed)
