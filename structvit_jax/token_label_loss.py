"""Token-labeling training (Jiang et al. 2021, as UniFormer trains its starred rows), on device.

The input pipeline (data/token_labels.py) adds to each training example its teacher's top-k
score map, `token_label` [2, k, h, w] (scores; class indices), already flipped with the image,
and `token_label_box` [4], the random-resized crop (x0, y0, x1, y1) as fractions of that map.
Here, inside the jitted step:
- `targets`: the top-k scores are scattered into a dense [h, w, classes] map; RoIAlign of the
  crop box gives the token targets on the last stage's grid and one class target for the
  crop; both go through a softmax over classes and label smoothing;
- mixup / CutMix mix these targets as they mix the images (per token under CutMix's box);
- `loss`: MixToken (a box of tokens swapped with the flipped batch after the first patch
  embedding, the aux tokens swapped back), then
  cls_weight * CE(head, class target mixed by the token box) +
  dense_weight * CE(aux_head per token, token targets).
Facts from the official trainer and where this differs: docs/token_labeling.md.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from structvit_jax import mixup as mixup_lib

KEYS = ("token_label", "token_label_box")  # the batch keys the pipeline adds
TOKEN_STRIDE = 32  # UniFormer's last stage: a token per 32 x 32 pixels


def enabled(batch: dict[str, Any]) -> bool:
  """Token labeling trains a step iff its batch carries token labels (static under jit)."""
  return "token_label" in batch


def roi_weights(lo: jax.Array, hi: jax.Array, size: int, out: int) -> jax.Array:
  """[B, out, size]: RoIAlign along one axis as a linear map, with torchvision's
  roi_align(aligned=False) on the box (lo, hi) * size - 0.5 (the official call): the box
  is cut into `out` bins, each the mean of bilinear samples at evenly spaced points, sample
  positions clamped to the map. The sample count per bin is fixed at ceil(size / out)
  (torchvision's adaptive count for a whole-map box; smaller boxes get more samples than
  torchvision takes, which only makes the bin average finer)."""
  samples = max(1, math.ceil(size / out))
  start = lo * size - 0.5
  length = jnp.maximum(hi * size - 0.5 - start, 1.0)
  step = (jnp.arange(out)[:, None] + (jnp.arange(samples)[None, :] + 0.5) / samples) / out
  pos = jnp.clip(start[:, None, None] + step[None] * length[:, None, None], 0.0, size - 1.0)
  low = jnp.floor(pos)
  frac = pos - low
  low = low.astype(jnp.int32)
  high = jnp.minimum(low + 1, size - 1)
  w = (jax.nn.one_hot(low, size) * (1.0 - frac)[..., None]
       + jax.nn.one_hot(high, size) * frac[..., None])
  return w.mean(axis=2)


def dense_scores(token_label: jax.Array, num_classes: int) -> jax.Array:
  """[B, 2, k, h, w] top-k (scores, indices) -> [B, h, w, classes], 0 outside the top-k."""
  scores = token_label[:, 0].astype(jnp.float32)
  index = token_label[:, 1].astype(jnp.int32)
  b, k, h, w = scores.shape
  bi, _, yi, xi = jnp.meshgrid(jnp.arange(b), jnp.arange(k), jnp.arange(h), jnp.arange(w),
                               indexing="ij")
  return jnp.zeros((b, h, w, num_classes), jnp.float32).at[bi, yi, xi, index].add(scores)


def _smooth(p: jax.Array, smoothing: float) -> jax.Array:
  return p * (1.0 - smoothing) + smoothing / p.shape[-1]


def targets(token_label: jax.Array, box: jax.Array, num_classes: int, grid: tuple[int, int],
            smoothing: float) -> tuple[jax.Array, jax.Array]:
  """(class targets [B, classes], token targets [B, gh * gw, classes]) for crops `box`
  [B, 4] (x0, y0, x1, y1 in [0, 1] of the map) on a gh x gw token grid: softmax over
  classes of the RoIAligned score map, then label smoothing."""
  scores = dense_scores(token_label, num_classes)
  _, h, w, _ = scores.shape
  gh, gw = grid
  wy, wx = roi_weights(box[:, 1], box[:, 3], h, gh), roi_weights(box[:, 0], box[:, 2], w, gw)
  tokens = jnp.einsum("biy,bjx,byxc->bijc", wy, wx, scores)
  crop = jnp.einsum("by,bx,byxc->bc", roi_weights(box[:, 1], box[:, 3], h, 1)[:, 0],
                    roi_weights(box[:, 0], box[:, 2], w, 1)[:, 0], scores)
  tokens = _smooth(jax.nn.softmax(tokens, axis=-1), smoothing)
  return (_smooth(jax.nn.softmax(crop, axis=-1), smoothing),
          tokens.reshape(tokens.shape[0], gh * gw, num_classes))


def mixtoken_box(rng: jax.Array, grid: tuple[int, int], scale: int = 8) -> jax.Array:
  """MixToken's box, int32 [y0, x0, y1, x1) on the last stage's token grid: the official
  draw (lam ~ Beta(1, 1), side ratio sqrt(1 - lam), centre uniform, clipped) on the stage-1
  grid (`scale` x finer), floored to whole last-stage tokens."""
  k_lam, k_y, k_x = jax.random.split(rng, 3)
  h, w = grid[0] * scale, grid[1] * scale
  ratio = jnp.sqrt(1.0 - jax.random.beta(k_lam, 1.0, 1.0))
  cut_h, cut_w = (h * ratio).astype(jnp.int32), (w * ratio).astype(jnp.int32)
  cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
  box = jnp.stack([jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cx - cut_w // 2, 0, w),
                   jnp.clip(cy + cut_h // 2, 0, h), jnp.clip(cx + cut_w // 2, 0, w)])
  return box // scale


def inputs(rng: jax.Array, batch: dict[str, jax.Array], num_classes: int,
           config: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(images mixed by mixup / CutMix, targets {cls, dense, gt, mix_box}) for `loss`."""
  images = batch["image"]
  grid = (images.shape[1] // TOKEN_STRIDE, images.shape[2] // TOKEN_STRIDE)
  k_mix, k_tok = jax.random.split(rng)
  cls, dense = targets(batch["token_label"], batch["token_label_box"].astype(jnp.float32),
                       num_classes, grid, config.label_smoothing)
  gt = mixup_lib.smooth_one_hot(batch["label"], num_classes, config.label_smoothing)
  if config.mixup_alpha > 0 or config.cutmix_alpha > 0:
    use_cutmix, box, lam = mixup_lib.mix_params(
        k_mix, images.shape[1], images.shape[2], mixup_alpha=config.mixup_alpha,
        cutmix_alpha=config.cutmix_alpha, switch_prob=config.mixup_switch_prob)
    images = mixup_lib.mix_images(images, use_cutmix, box, lam)
    mix = lambda t, l: t * l + t[::-1] * (1.0 - l)
    cls, gt = mix(cls, lam), mix(gt, lam)
    # Per token: the share of its pixels that CutMix took from the flipped batch.
    cover = box.reshape(grid[0], images.shape[1] // grid[0], grid[1], -1).mean((1, 3))
    per_token = jnp.where(use_cutmix, 1.0 - cover.reshape(-1), lam)[None, :, None]
    dense = mix(dense, per_token)
  tl = config.get("token_label", ml_collections.ConfigDict())
  if tl.get("mix_token", True):
    mix_box = mixtoken_box(k_tok, grid)
  else:
    mix_box = jnp.zeros((4,), jnp.int32)  # an empty box: nothing mixed
  # Per example (the same box), so grad accumulation can split targets along the batch.
  mix_box = jnp.broadcast_to(mix_box, (images.shape[0], 4))
  return images, dict(cls=cls, dense=dense, gt=gt, mix_box=mix_box)


def loss(apply: Callable[..., Any], x: jax.Array, t: dict[str, jax.Array],
         config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array, Any]:
  """(loss, logits for metrics, model state updates); `apply(x, dense=, mix_box=)` runs the
  model in train mode."""
  tl = config.get("token_label", ml_collections.ConfigDict())
  box = t["mix_box"][0]
  (logits, aux), updates = apply(x, dense=True, mix_box=box)
  n = aux.shape[1]
  cls = t["cls"]
  if tl.get("ground_truth", False):
    # Official option: lean on the ground truth more where the teacher's top-1 disagrees.
    agree = jnp.argmax(t["gt"], -1) == jnp.argmax(cls, -1)
    ratio = (0.9 - 0.4 * agree)[:, None]
    cls = cls * ratio + t["gt"] * (1.0 - ratio)
  lam = 1.0 - ((box[2] - box[0]) * (box[3] - box[1])).astype(jnp.float32) / n
  cls = cls * lam + cls[::-1] * (1.0 - lam)
  ce = lambda logits, target: -(target * jax.nn.log_softmax(logits, -1)).sum(-1).mean()
  total = (tl.get("cls_weight", 1.0) * ce(logits, cls)
           + tl.get("dense_weight", 1.0) * ce(aux, t["dense"]))
  return total, logits, updates
