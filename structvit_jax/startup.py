"""The overlapped start-up: a fresh run's init on a thread while the train step compiles
(`init_overlapped`), the eval step compiled on a thread while training runs
(`compile_eval_in_background`), and where the start-up time went (`StartupTimes`).
"""

import os
import threading
import time
from typing import Any, Iterator

from absl import logging
import jax
import numpy as np

from structvit_jax import sharding as shard_lib


class Background:
  """fn() on a daemon thread; result() waits and returns its value or raises its exception
  (with the thread's traceback) in the caller."""

  def __init__(self, fn: Any, name: str):
    self._value, self._error = None, None
    self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
    self._thread.start()

  def _run(self, fn) -> None:
    try:
      self._value = fn()
    except BaseException as e:  # re-raised by result()
      self._error = e

  def result(self) -> Any:
    self._thread.join()
    if self._error is not None:
      raise self._error
    return self._value


def usable_cores() -> int:
  if hasattr(os, "sched_getaffinity"):  # the cores this process may run on (taskset, cgroups)
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def init_overlapped(setup: Any, config: Any, batches: Iterator, startup: "StartupTimes"
                    ) -> tuple[Any, Any]:
  """A fresh start: the init (and config.init_from) runs on a thread while this one reads the
  first of `batches` and compiles the train step for it (it needs only the state's shapes);
  XLA compiles release the GIL, so the two overlap on 2+ cores (on one core, where the
  threads would only contend, the init runs after the compile). Returns (state, the first
  batch). An error on either side is raised here."""
  init = lambda: setup.restore_or_init(config, None)
  job = Background(init, "init") if usable_cores() > 1 else None
  where = " (init on a thread)" if job else ""
  first = next(batches)
  startup.mark("first batch" + where)
  setup.compile_train(first)
  startup.mark("train-step compile" + where)
  state = job.result() if job else init()
  startup.mark("rest of the init" if job else "init")
  return state, first


class StartupTimes:
  """Where the start-up goes, logged once the first step is done (benchmarks/startup.py)."""

  def __init__(self):
    self.last = time.perf_counter()
    self.parts: list[str] = []

  def mark(self, name: str) -> None:
    now = time.perf_counter()
    self.parts.append(f"{name} {now - self.last:.1f} s")
    self.last = now

  def first_step(self, batch_s: float, step_s: float) -> None:
    self.parts += [f"first batch {batch_s:.1f} s", f"first step {step_s:.1f} s"]
    logging.info("Start-up: %s; %.1f s CPU since the process started", ", ".join(self.parts),
                 time.process_time())


def compile_eval_in_background(setup: Any) -> Background:
  """Compiles setup's eval step on a thread (while training steps run), for the shapes of one
  batch of a fresh eval pass (read and dropped); the first evaluation then finds it
  compiled. result() raises a failure of it."""
  def compile_eval():
    it = setup.eval_inp.make_eval_iterator()
    try:
      local = next(it)
    finally:
      if hasattr(it, "close"):
        it.close()
    data, nproc = shard_lib.batch_sharding(setup.mesh), jax.process_count()
    keys = setup.new_evaluator().keys
    batch = {k: jax.ShapeDtypeStruct((v.shape[0] * nproc, *v.shape[1:]), np.asarray(v).dtype,
                                     sharding=data)
             for k, v in local.items() if k in keys}
    with jax.set_mesh(setup.mesh):
      setup.eval_fn.lower(setup.abstract_sharded.params, setup.abstract_sharded.batch_stats,
                          batch).compile()
  return Background(compile_eval, "eval compile")
