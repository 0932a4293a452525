"""Where a run's state comes from (the resume policy): the workdir's newest checkpoint that
restores and fits the model, else config.resume, else a fresh init (with config.init_from's
weights). What a resume may change of the config is config_checks.py's.
"""

from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from structvit_jax import checkpoint as ckpt_lib
from structvit_jax import train_state


def check_fits(abstract_state: Any, config: ml_collections.ConfigDict, directory: str
               ) -> Callable[[int, Any], None]:
  """A Checkpointer.restore check: the checkpoint's params/batch_stats tree and shapes
  are those of config's model, else one CheckpointMismatchError naming the difference."""
  def check(step, metadata):
    diff = ckpt_lib.tree_difference(
        {"params": abstract_state.params, "batch_stats": abstract_state.batch_stats},
        {"params": metadata["params"], "batch_stats": metadata.get("batch_stats", {})},
        what=f"the requested {config.model.name}", where=f"checkpoint step {step}")
    if diff:
      raise ckpt_lib.CheckpointMismatchError(
          f"checkpoint step {step} in {directory} was not written by the requested model "
          f"{config.model.name}: {diff}")
  return check


def restore_newest(setup: Any, config: ml_collections.ConfigDict, data_iter: Any = None
                   ) -> tuple[train_state.TrainState, int] | None:
  """(state, step) of the newest usable checkpoint in setup's (train._Setup's) workdir,
  else in config.resume; None when there is neither. A damaged newest checkpoint falls back
  to the newest step that restores (Checkpointer.restore); a checkpoint of another model
  raises CheckpointMismatchError."""
  if setup.ckpt.latest_step() is not None:
    source = setup.ckpt
  elif config.resume:
    source = ckpt_lib.Checkpointer(config.resume, read_only=True)
  else:
    return None
  try:
    return source.restore(setup.abstract_sharded, data_iter=data_iter,
                          check=check_fits(setup.abstract_state, config, source.directory))
  finally:
    if source is not setup.ckpt:
      source.close()


def restore_or_init(setup: Any, config: ml_collections.ConfigDict, data_iter: Any
                    ) -> train_state.TrainState:
  """Workdir checkpoint -> config.resume -> config.init_from.checkpoint -> scratch."""
  restored = restore_newest(setup, config, data_iter)
  if restored is not None:
    return restored[0]
  state = setup.init()
  init_from = config.init_from
  if init_from.checkpoint:
    # A training checkpoint dir, an export or an official .pth; weights.fit inflates 2D
    # kernels, resizes TimeSformer embeddings, re-initialises the head (drop_head) and puts
    # StructSA kernels at the identity centre tap for a UniFormer source.
    from structvit_jax import weights
    abstract = {"params": setup.abstract_state.params,
                "batch_stats": setup.abstract_state.batch_stats}
    loaded = weights.init_variables_from(
        init_from.checkpoint, abstract,
        lambda: {"params": state.params, "batch_stats": state.batch_stats},
        inflate_mode=init_from.get("inflate", ""), drop_head=init_from.get("drop_head", False))
    # Host numpy -> the trainer's shardings (every process loaded the same values).
    host = lambda t: jax.tree.map(np.asarray, t)
    params = jax.device_put(host(loaded["params"]), setup.shardings.params)
    batch_stats = jax.device_put(host(loaded["batch_stats"]), setup.shardings.batch_stats)
    ema = params if config.ema_decay > 0 else state.ema_params
    state = state.replace(params=params, batch_stats=batch_stats,
                          ema_params=jax.tree.map(jnp.copy, ema))
    logging.info("Initialised params from %s (inflate=%r, drop_head=%s)",
                 init_from.checkpoint, init_from.get("inflate", ""),
                 init_from.get("drop_head", False))
  return state
