"""Orbax checkpoints of the train state together with the grain data-iterator state.

Layout: <dir>/<step>/state/ (params, opt_state, batch_stats, EMA, step, RNG) and
<dir>/<step>/data_iter/process_<i>-of-<n>.json (one file per process). Saves are async;
restores always take a target built from jax.eval_shape with the shardings the trainer uses
(STACK.md G9), so an array comes back directly on its devices, replicated or FSDP-sharded.
"""

import signal
import threading
from typing import Any

from absl import logging
import grain
import grain.checkpoint  # noqa: F401  (registers CheckpointSave/Restore with orbax)
import jax
import orbax.checkpoint as ocp


_single_process_handler = False


class Checkpointer:
  """A CheckpointManager on `directory`: async saves, keeps the newest `keep`."""

  def __init__(self, directory: str, keep: int = 3, read_only: bool = False):
    self.directory = directory
    global _single_process_handler
    if jax.process_count() == 1 and not _single_process_handler:
      _single_process_handler = True
      # Replica-parallel saving slices every replicated array with a small jitted op per
      # shape (seconds of compiles on the first save with many devices) and only pays off
      # when several hosts share the writing.
      ocp.type_handlers.register_type_handler(
          jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
          override=True)
    self.manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, read_only=read_only,
            create=not read_only))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any = None) -> None:
    """Starts an async save of `state` (and the iterator state, written synchronously)."""
    if self.manager.latest_step() == step:
      return
    items = dict(state=ocp.args.StandardSave(state))
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    logging.info("Checkpoint: saving step %d to %s (async)", step, self.directory)

  def restore(self, abstract_state: Any, step: int | None = None,
              data_iter: Any = None) -> tuple[Any, int]:
    """Restores into the structure/shardings of `abstract_state` (ShapeDtypeStructs with
    .sharding). Restores the data iterator in place when given. Returns (state, step)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}")
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Checkpoint: restored step %d from %s", step, self.directory)
    return out["state"], step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    """Multi-host preemption sync point (all processes agree on the step)."""
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state, shardings)


class SigtermFlag:
  """Sets a flag on SIGTERM so the loop can save, wait and exit 0 (single process).

  With several processes JAX's own preemption service handles SIGTERM and every process
  learns about it at the same step through Checkpointer.reached_preemption (a Python
  handler here would replace JAX's and let processes disagree), so it is not installed.
  """

  def __init__(self):
    self.event = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self.event.set()

  def is_set(self) -> bool:
    return self.event.is_set()

  def restore_handler(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
