"""Optimiser, learning-rate schedule, weight-decay mask and EMA (DeiT / timm semantics)."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Parameters whose path contains one of these never get weight decay (position encodings,
# including UniFormer's depthwise position-encoding convs, and class/distillation tokens).
NO_DECAY_KEYWORDS = ("pos_embed", "cls_token", "dist_token")


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


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: matrices and conv kernels, except position
  encodings and tokens. All 1-D params (norm scales/biases, biases, layer-scale gammas)
  are excluded by their rank."""
  def keep(path, p):
    name = _path_str(path)
    return p.ndim >= 2 and not any(k in name for k in NO_DECAY_KEYWORDS)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == "adamw":
    parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                             weight_decay=config.weight_decay, mask=decay_mask))
  elif config.optimizer == "sgd":
    parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=config.momentum, nesterov=False))
  else:
    raise ValueError(f"Unknown optimizer {config.optimizer!r}; valid: 'adamw', 'sgd'.")
  return optax.chain(*parts)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """EMA of params, in fp32: ema <- decay * ema + (1 - decay) * params."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32),
                      ema, params)

