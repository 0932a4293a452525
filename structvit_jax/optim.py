"""Optimiser, learning-rate schedule, weight-decay mask and EMA (DeiT / timm semantics)."""

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Parameters whose path contains one of these never get weight decay (position encodings,
# including UniFormer's depthwise position-encoding convs, and class/distillation tokens):
# the 'no_pos_embed' rule.
NO_DECAY_KEYWORDS = ("pos_embed", "cls_token", "dist_token")
# The official models' no_weight_decay() names, which timm matches against whole parameter
# names: only top-level leaves (DeiT's pos_embed / cls_token), never UniFormer's per-block
# `blocksK.i.pos_embed.weight` (docs/official_weights.md, "Weight decay").
# time_embed: the video DeiT's temporal table, pos_embed's twin (TimeSformer's no_weight_decay()).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "time_embed")
# Leaves that are vectors here but [1, C, 1, 1] in PyTorch, so rank > 1 for the official
# rule: TL UniFormer-L's CBlock layer scale (stages 1-2).
_TORCH_4D_VECTORS = re.compile(r"^blocks[12]_\d+/gamma_[12]$")
# config.weight_decay_mask: the rule deciding which leaves weight decay applies to.
DECAY_RULES = ("no_pos_embed", "timm", "all")


def scaled_lr(config: ml_collections.ConfigDict) -> float:
  """Peak lr, scaled linearly with the global batch size: lr * batch / lr_base_batch_size."""
  return config.lr * config.batch_size / config.lr_base_batch_size


def make_schedule(config: ml_collections.ConfigDict, total_steps: int,
                  steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up from warmup_lr to the scaled lr, then cosine to min_lr (or steps).

  The schedule's epochs (warmup_epochs, lr_step_epochs) are data epochs, except with
  config.num_train_steps > 0, which sets the run's length: then they keep their share of
  the run, an epoch of the schedule being num_train_steps / num_epochs steps (a 60-step
  run of a 10-epoch recipe with 0.5 warm-up epochs warms up for 3 steps, not 59).
  """
  peak = scaled_lr(config)
  if config.get("num_train_steps", -1) > 0 and config.get("num_epochs", 0) > 0:
    steps_per_epoch = total_steps / config.num_epochs
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, max(total_steps - 1, 0))
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=config.warmup_lr, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=config.min_lr)
  if config.schedule == "steps":
    boundaries = {int(round(e * steps_per_epoch)) - warmup: config.lr_step_factor
                  for e in config.lr_step_epochs}
    return optax.join_schedules(
        [optax.linear_schedule(config.warmup_lr, peak, max(warmup, 1)),
         optax.piecewise_constant_schedule(peak, boundaries)], [warmup])
  raise ValueError(f"Unknown schedule {config.schedule!r}; valid: 'cosine', 'steps'.")


def decay_mask(params: Any, rule: str = "no_pos_embed") -> Any:
  """True where weight decay applies (config.weight_decay_mask, docs/official_weights.md):

  - 'no_pos_embed': matrices and conv kernels, except position encodings (UniFormer's
    position-encoding convs included) and tokens; all 1-D params (norm scales/biases,
    biases, layer-scale gammas) are excluded by their rank.
  - 'timm': the official image trainers (timm `create_optimizer`) and UniFormer's video
    trainer (SlowFast `construct_optimizer`, ZERO_WD_1D_PARAM): every parameter of rank > 1
    in the PyTorch layout except the top-level NO_DECAY_NAMES, so UniFormer's
    position-encoding convs are decayed.
  - 'all': every parameter (TimeSformer's trainer: no BatchNorm in a ViT, nothing exempt).
  """
  if rule not in DECAY_RULES:
    raise ValueError(f"weight_decay_mask={rule!r}; valid: {', '.join(map(repr, DECAY_RULES))}")

  def keep(path, p):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    if rule == "all":
      return True
    if rule == "timm":
      return (p.ndim >= 2 or bool(_TORCH_4D_VECTORS.match(name))) and \
          name not in NO_DECAY_NAMES
    return p.ndim >= 2 and not any(k in name for k in NO_DECAY_KEYWORDS)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  parts = []
  rule = config.get("weight_decay_mask", "no_pos_embed")
  decay_mask({}, rule)  # an unknown rule fails here, not at the first tx.init
  mask = functools.partial(decay_mask, rule=rule)
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == "adamw":
    parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                             weight_decay=config.weight_decay, mask=mask))
  elif config.optimizer == "sgd":
    parts.append(optax.add_decayed_weights(config.weight_decay, mask=mask))
    parts.append(optax.sgd(schedule, momentum=config.momentum, nesterov=False))
  else:
    raise ValueError(f"Unknown optimizer {config.optimizer!r}; valid: 'adamw', 'sgd'.")
  return optax.chain(*parts)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """EMA of params, in fp32: ema <- decay * ema + (1 - decay) * params."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32),
                      ema, params)

