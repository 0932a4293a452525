"""The training loop and evaluation: jax.jit over global arrays on a ('data',) mesh.

`train_and_evaluate(config, workdir)` trains with periodic evaluation and checkpoints;
`evaluate(config, workdir)` evaluates the newest checkpoint. Both run from main.py or a
notebook. The state and steps are train_state.py's, where the state comes from resume.py's,
the overlapped start-up startup.py's, the config checks config_checks.py's.
"""

import math
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from structvit_jax import checkpoint as ckpt_lib
from structvit_jax import config_checks
from structvit_jax import device_input
from structvit_jax import evaluation
from structvit_jax import optim
from structvit_jax import paths
from structvit_jax import resume
from structvit_jax import run_log
from structvit_jax import sharding as shard_lib
from structvit_jax import startup
from structvit_jax import token_label_loss
from structvit_jax import train_state
from structvit_jax.train_state import TrainState
from structvit_jax.workdir import Workdir


def create_input(config, split, local_batch_size, seed):
  from structvit_jax import data as data_lib  # data is independent of the trainer
  # uint8 batches: normalised (and erased) in the jitted steps (device_input.py).
  return data_lib.create_input(config, split=split, local_batch_size=local_batch_size,
                               process_index=jax.process_index(),
                               process_count=jax.process_count(), seed=seed, uint8=True)


class _Setup:
  """Everything train and eval share: inputs, model, optimiser, shardings, jitted fns."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               devices: list[jax.Device] | None, train: bool):
    shard_lib.initialize_distributed(config)
    logging.info("JAX process %d / %d; local devices %d, global devices %d (%s); pid %d",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].platform, os.getpid())
    self.mesh = shard_lib.make_mesh(devices)
    config_checks.check_batch_sizes(config, self.mesh.devices.size)
    nproc = jax.process_count()
    self.train_inp = (create_input(config, "train", config.batch_size // nproc, config.seed)
                      if train else None)
    self.eval_inp = create_input(config, "eval",
                                 (config.eval_batch_size or config.batch_size) // nproc,
                                 config.seed)
    self.num_classes = self.eval_inp.num_classes
    self.input_shape = tuple(self.eval_inp.input_shape)
    self.model = train_state.build_model(config, self.num_classes)
    self.model_name = config.model.name  # the preset, e.g. structvit_tiny (a UniFormer)
    n_train = self.train_inp.num_examples if train else self.eval_inp.num_examples
    # Durations are epochs in configs, steps here (num_train_steps > 0 overrides them).
    self.steps_per_epoch = max(1, n_train // config.batch_size)
    self.total_steps = (config.num_train_steps if config.num_train_steps > 0 else
                        int(math.ceil(config.num_epochs * self.steps_per_epoch)))
    self.schedule = optim.make_schedule(config, self.total_steps, self.steps_per_epoch)
    self.tx = optim.make_optimizer(config, self.schedule)
    self.abstract_state, self.shardings, self.init = train_state.make_init(
        config, self.model, self.tx, self.input_shape, self.mesh, config.seed)
    self.abstract_sharded = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        self.abstract_state, self.shardings)
    self.new_evaluator = lambda: evaluation.evaluator_for(config)
    self.eval_fn = train_state.jit_eval_step(self.model, self.eval_inp.normalization,
                                             self.shardings, self.mesh,
                                             self.new_evaluator().outputs)
    self.train_fn = train_state.jit_train_step(
        config, self.model, self.tx, self.schedule, self.num_classes,
        self.train_inp.normalization if train else None, self.shardings, self.mesh)
    self.ckpt = ckpt_lib.Checkpointer(Workdir(workdir).checkpoints,
                                      keep=config.keep_checkpoints)

  # resume.py's policy, a method so that startup.init_overlapped can run it on a thread.
  restore_or_init = resume.restore_or_init

  def compile_train(self, batch: dict[str, jax.Array]) -> None:
    """Compiles the train step for the state's shapes and `batch`'s, ahead of its first
    call, which then finds the program in jit's in-memory cache (no second compile)."""
    with jax.set_mesh(self.mesh):
      self.train_fn.lower(self.abstract_sharded, batch).compile()


def _log_model_size(setup: _Setup, writer: run_log.MetricWriter) -> None:
  from structvit_jax import flops
  n_params = flops.count_params(setup.abstract_state.params)
  gmacs = None
  try:
    abstract = setup.abstract_state
    variables = {"params": abstract.params, "batch_stats": abstract.batch_stats}
    gmacs = flops.count_model_macs(setup.model, setup.input_shape,
                                   variables=variables)["total"] / 1e9
  except Exception as e:  # the count is informative only; never block training on it
    logging.warning("GFLOPs count failed: %s", e)
  logging.info("Model %s (%s): %.3f M params, %s GFLOPs (MACs) per example",
               setup.model_name, type(setup.model).__name__, n_params / 1e6,
               "?" if gmacs is None else f"{gmacs:.3f}")
  writer.scalars(0, {"model/params_M": n_params / 1e6,
                     **({} if gmacs is None else {"model/gflops": gmacs})})


def _eval_and_log(setup: _Setup, state: TrainState, config: ml_collections.ConfigDict,
                  writer: run_log.MetricWriter, step: int) -> dict[str, float]:
  results = {}
  variants = [("eval", state.params)]
  if config.ema_decay > 0:
    variants.append(("eval_ema", state.ema_params))
  for prefix, params in variants:
    m = train_state.run_eval(setup.eval_fn, params, state.batch_stats, setup.eval_inp,
                             setup.mesh, setup.new_evaluator())
    results.update({f"{prefix}/{k}": v for k, v in m.items()})
    run_log.log_console(run_log.eval_line(prefix, step, m))
  bad = [f"{k}={v}" for k, v in results.items()
         if isinstance(v, (int, float, np.number)) and not math.isfinite(float(v))]
  if bad:  # not recorded: eval_results.jsonl and TensorBoard keep finite results only
    raise FloatingPointError(
        f"Non-finite evaluation at step {step}: {', '.join(bad)} (not recorded in "
        f"{Workdir(writer.workdir).eval_results}); the checkpoint of step "
        f"{step} is kept. Stopping.")
  writer.scalars(step, {k: v for k, v in results.items()
                        if not k.endswith(("count", "views"))})
  writer.eval_record(step, results)
  return results


def _due(step: int, every: int, total: int) -> bool:
  """The rule of logging, checkpoints and evaluations: every `every` steps and at the end."""
  return step % every == 0 or step == total


class _Loop:
  """The training loop: the batches read ahead, the metrics fetched one step late, the
  log lines; close() releases what it holds on every exit."""

  def __init__(self, setup: _Setup, config: ml_collections.ConfigDict):
    self.setup, self.config = setup, config
    self.batches = None             # the global batches, read ahead on a thread
    self.writer = None
    self.sigterm = None
    self.history: list[dict] = []   # host metrics since the last log line
    self.bad = evaluation.BadCount()  # unreadable examples replaced, per log line and in all
    self.pending = None             # (step, device metrics): fetched one step late

  def read(self) -> device_input.DevicePrefetcher:
    mesh = self.setup.mesh
    self.batches = device_input.DevicePrefetcher(
        self.setup.train_inp.iterator,
        # 'bad', 'erase' (random-erasing boxes), the token-labeling targets: optional
        lambda b: shard_lib.global_batch(mesh, {k: b[k] for k in (
            "image", "label", "bad", "erase", *token_label_loss.KEYS) if k in b}))
    return self.batches

  def start(self, times: startup.StartupTimes) -> tuple[TrainState, Any]:
    """(state, the first batch when a fresh start already read it, else None)."""
    setup = self.setup
    if setup.ckpt.latest_step() is None and not self.config.resume:
      return startup.init_overlapped(setup, self.config, self.read(), times)
    state = setup.restore_or_init(self.config, setup.train_inp.iterator)
    times.mark("restore")
    return state, None

  def flush(self) -> None:
    """Fetches the pending step's metrics: one step late keeps the device busy; the check
    still names the step."""
    if self.pending is None:
      return
    (s, m), self.pending = self.pending, None
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    self.bad.add(m)
    if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
      last = self.setup.ckpt.latest_step()
      raise FloatingPointError(
          f"Non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) at step {s}. "
          "Stopping; " + (f"the last good checkpoint (step {last}) in "
                          f"{self.setup.ckpt.directory} is kept." if last is not None
                          else "no checkpoint was saved before it."))
    self.history.append(m)

  def save(self, step: int, state: TrainState) -> None:
    self.flush()  # never checkpoint a state that came from a non-finite loss
    # The input position after the last batch the steps took, not after the read-ahead.
    self.setup.ckpt.save(step, state, self.batches)

  def log(self, step: int, total: int, progress: run_log.Progress) -> None:
    self.flush()
    avg = {k: float(np.mean([h[k] for h in self.history])) for k in self.history[0]}
    avg["lr"] = self.history[-1]["lr"]
    self.history.clear()
    avg.update(progress.tick(step), **self.bad.take())
    run_log.log_console(run_log.console_line(step, total, avg) + self.bad.console())
    self.writer.scalars(step, {f"train/{k}": v for k, v in avg.items()})

  def run(self, state: TrainState, first_batch: Any, times: startup.StartupTimes
          ) -> tuple[TrainState, dict, bool]:
    """Steps to the end, or to a preemption (saved): (state, last eval, preempted)."""
    setup, config = self.setup, self.config
    step, total = int(jax.device_get(state.step)), setup.total_steps
    eval_every = max(1, int(round(config.eval_every_epochs * setup.steps_per_epoch)))
    logging.info("Training steps %d..%d (%d/epoch, global batch %d); eval every %d steps",
                 step, total, setup.steps_per_epoch, config.batch_size, eval_every)
    self.sigterm = ckpt_lib.SigtermFlag()
    progress = run_log.Progress(total, config.batch_size, step)
    eval_results: dict = {}
    compiled = False
    eval_compile = None  # the eval step's compile on a thread, until the first eval
    # The step dispatch runs under a transfer guard ('disallow' by default): an implicit
    # device->host or host->device transfer there (a host sync, or a numpy input that makes
    # every step re-upload) raises instead of silently stalling the pipeline. The metrics
    # are fetched one step late, outside the guard, with an explicit jax.device_get.
    guard = config.get("transfer_guard", "disallow")
    # The next batches are read and put on the devices while the current step runs.
    batches = self.read() if self.batches is None else self.batches
    while step < total:
      t0 = time.perf_counter()  # time the step waits for its batch (on the devices)
      batch = next(batches) if first_batch is None else first_batch
      first_batch = None
      progress.add_data_time(time.perf_counter() - t0)
      # The mesh in context lets kernels that must be shard_mapped (Pallas flash attention
      # on a multi-chip TPU, models/attention.py) see it at trace time.
      t1 = time.perf_counter()
      with (jax.set_mesh(setup.mesh), jax.transfer_guard_device_to_host(guard),
            jax.transfer_guard_host_to_device(guard)):
        state, m = setup.train_fn(state, batch)
      if not compiled:  # the first call compiles: keep that out of step time and ETA
        jax.block_until_ready(m)
        progress.add_pause(time.perf_counter() - t1)
        compiled = True
        times.first_step(t1 - t0, time.perf_counter() - t1)
        if startup.usable_cores() > 1:  # on one core the thread would only contend
          eval_compile = startup.compile_eval_in_background(setup)
      step += 1
      self.flush()
      self.pending = (step, m)
      preempted = (self.sigterm.is_set() if jax.process_count() == 1
                   else setup.ckpt.reached_preemption(step))
      if _due(step, config.log_every_steps, total):
        self.log(step, total, progress)
      if preempted:
        self.save(step, state)
        setup.ckpt.wait()
        logging.warning("Preempted: saved step %d; exiting.", step)
        return state, eval_results, True
      if _due(step, config.checkpoint_every_steps, total):
        progress.pause()
        self.save(step, state)
        progress.resume()
      if _due(step, eval_every, total):
        progress.pause()
        eval_compile = eval_compile and eval_compile.result()  # raises its failure, once
        eval_results = _eval_and_log(setup, state, config, self.writer, step)
        progress.resume()
    return state, eval_results, False

  def close(self) -> None:
    if self.sigterm is not None:
      self.sigterm.restore_handler()
    self.setup.ckpt.close()
    if self.writer is not None:
      self.writer.close()
    if self.batches is not None:
      self.batches.close()  # closes the train iterator
    elif hasattr(self.setup.train_inp.iterator, "close"):
      self.setup.train_inp.iterator.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: list[jax.Device] | None = None) -> tuple[TrainState, dict]:
  """Trains (resuming if possible) and evaluates; returns (final state, last eval metrics).

  devices: the devices of the mesh (default: all); tests use a subset.
  """
  config_checks.check_resume_config(config, workdir)
  times = startup.StartupTimes()
  setup = _Setup(config, workdir, devices, train=True)
  times.mark("setup")
  loop = _Loop(setup, config)
  try:
    state, first_batch = loop.start(times)
    # What `python -m structvit_jax.export` rebuilds the model from: written once the run's
    # state is known to fit it (after a restore or a fresh start), atomically.
    if jax.process_index() == 0:
      paths.write_atomic(Workdir(workdir).config_json, config.to_json_best_effort(indent=2))
    loop.writer = run_log.MetricWriter(workdir)
    _log_model_size(setup, loop.writer)
    times.mark("model size")
    state, eval_results, preempted = loop.run(state, first_batch, times)
    if preempted:
      return state, eval_results
    step = int(jax.device_get(state.step))
    missing = not eval_results and not any(r.get("step") == step
                                           for r in run_log.read_eval_records(workdir))
    if jax.process_count() > 1:  # process 0's file decides: every process must evaluate
      from jax.experimental import multihost_utils
      missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
    if missing:
      # A finished run killed during its final evaluation: run it now.
      logging.info("Step %d has no evaluation in %s: evaluating.", step,
                   Workdir(workdir).eval_results)
      eval_results = _eval_and_log(setup, state, config, loop.writer, step)
    return state, eval_results
  finally:
    loop.close()


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             devices: list[jax.Device] | None = None) -> dict[str, float]:
  """Evaluates the newest checkpoint in workdir (else config.resume) and its EMA; a
  damaged newest step: the newest that restores, with a warning (as in training)."""
  setup = _Setup(config, workdir, devices, train=False)
  writer = run_log.MetricWriter(workdir)
  try:
    restored = resume.restore_newest(setup, config)
    if restored is None:
      raise FileNotFoundError(f"No checkpoint in {setup.ckpt.directory} and no config.resume.")
    state, step = restored
    return _eval_and_log(setup, state, config, writer, step)
  finally:
    setup.ckpt.close()
    writer.close()
