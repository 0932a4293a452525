"""Training and evaluation loops: jax.jit over global arrays on a ('data',) mesh.

`train_and_evaluate(config, workdir)` trains with periodic evaluation and checkpoints;
`evaluate(config, workdir)` evaluates the newest checkpoint. Both run from main.py or a
notebook. Start order: checkpoint in workdir -> config.resume -> config.init_from -> scratch.
"""

import functools
import json
import math
import os
import threading
import time
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from structvit_jax import checkpoint as ckpt_lib
from structvit_jax import device_input
from structvit_jax import evaluation
from structvit_jax import metrics as metrics_lib
from structvit_jax import mixup as mixup_lib
from structvit_jax import optim
from structvit_jax import paths
from structvit_jax import sharding as shard_lib
from structvit_jax import token_labeling


@flax.struct.dataclass
class TrainState:
  step: jax.Array         # int32 scalar: number of optimiser updates done
  params: Any             # fp32
  batch_stats: Any        # BatchNorm running statistics ({} for models without BN)
  opt_state: Any
  ema_params: Any         # EMA of params ({} when config.ema_decay == 0)
  rng: jax.Array          # base key; each step uses fold_in(rng, step)


# ----------------------------------------------------------------------------- building


def create_input(config, split, local_batch_size, seed):
  from structvit_jax import data as data_lib  # data is independent of the trainer
  # uint8 batches: normalised (and erased) in the jitted steps (device_input.py).
  return data_lib.create_input(config, split=split, local_batch_size=local_batch_size,
                               process_index=jax.process_index(),
                               process_count=jax.process_count(), seed=seed, uint8=True)


def model_kwargs(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
  """The get_model overrides of config's model (JSON-serialisable: dtype as a string); every
  zoo model has `dtype` and `remat` fields."""
  return {**config.model.kwargs.to_dict(), "num_classes": num_classes, "dtype": config.dtype,
          "remat": config.remat}


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  from structvit_jax.models import get_model
  return get_model(config.model.name, **model_kwargs(config, num_classes))


def train_steps(config: ml_collections.ConfigDict, num_examples: int) -> tuple[int, int]:
  """(total steps, steps per epoch): durations are epochs in configs, steps here."""
  steps_per_epoch = max(1, num_examples // config.batch_size)
  total = config.num_train_steps
  if total <= 0:
    total = int(math.ceil(config.num_epochs * steps_per_epoch))
  return total, steps_per_epoch


def init_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
               input_shape: tuple[int, ...], ema: bool) -> TrainState:
  params_rng, dropout_rng, train_rng = jax.random.split(rng, 3)
  x = jnp.zeros((1, *input_shape), jnp.float32)
  variables = model.init({"params": params_rng, "dropout": dropout_rng}, x, train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else {},
                    rng=train_rng)


# ----------------------------------------------------------------------------- steps


def _variables(params, batch_stats):
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               config: ml_collections.ConfigDict, num_classes: int,
               normalization: device_input.Normalization | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update. uint8 images are normalised with `normalization` (the dataset's, a
  constant) and randomly erased where the batch has `erase` boxes, before mixup."""
  # Randomness depends only on (seed, step) and global shapes, never on the device count
  # (threefry is partitionable), so 1 and 8 devices draw the same mixup and drop path.
  step_rng = jax.random.fold_in(state.rng, state.step)
  mix_rng, drop_rng = jax.random.split(step_rng)
  erase_rng = jax.random.fold_in(step_rng, 1)  # apart from the split: mixup keys unchanged
  # uint8 -> normalised (and erased) float images, then the mixing of the recipe.
  batch = {**batch, "image": device_input.images(batch, normalization, erase_rng)}
  token_labels = token_labeling.enabled(batch)
  if token_labels:  # dense targets, MixToken, aux loss: token_labeling.py
    images, targets = token_labeling.inputs(mix_rng, batch, num_classes, config)
  else:
    images, targets = mixup_lib.mixup_cutmix(
        mix_rng, batch["image"], batch["label"], num_classes,
        mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
        switch_prob=config.mixup_switch_prob, label_smoothing=config.label_smoothing)

  def loss_fn(params, batch_stats, x, t, rng):
    apply = functools.partial(model.apply, _variables(params, batch_stats), train=True,
                              rngs={"dropout": rng}, mutable=["batch_stats"])
    if token_labels:
      loss, logits, updates = token_labeling.loss(apply, x, t, config)
    else:
      logits, updates = apply(x)
      logits = logits.astype(jnp.float32)
      loss = optax.softmax_cross_entropy(logits, t).mean()
    return loss, (logits, updates.get("batch_stats", batch_stats))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  accum = config.grad_accum_steps
  if accum == 1:
    (loss, (logits, batch_stats)), grads = grad_fn(
        state.params, state.batch_stats, images, targets, drop_rng)
  else:
    # Microbatch i = examples i, i+accum, ...: every microbatch spans all devices.
    b = images.shape[0]
    micro = lambda a: a.reshape(b // accum, accum, *a.shape[1:]).swapaxes(0, 1)

    def body(carry, xs):
      g_sum, l_sum, bs = carry
      x, t, i = xs
      (l, (lg, bs)), g = grad_fn(state.params, bs, x, t, jax.random.fold_in(drop_rng, i))
      return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, bs), lg

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss, batch_stats), logits = jax.lax.scan(
        body, (zeros, jnp.zeros((), jnp.float32), state.batch_stats),
        (micro(images), jax.tree.map(micro, targets), jnp.arange(accum)))
    grads = jax.tree.map(lambda g: g / accum, grads)
    loss = loss / accum
    logits = logits.swapaxes(0, 1).reshape(b, -1)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if config.ema_decay > 0:
    ema = optim.ema_update(ema, params, config.ema_decay)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema_params=ema)
  labels = batch["label"]
  metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state.step),
                 top1=evaluation.topk_correct(logits, labels, 1).mean(),
                 top5=evaluation.topk_correct(logits, labels, 5).mean(),
                 **evaluation.BadCount.of(batch))
  return new_state, metrics


def eval_step(params: Any, batch_stats: Any, batch: dict[str, jax.Array], *,
              model: nn.Module, outputs=evaluation.Classification.outputs,
              normalization: device_input.Normalization | None = None) -> dict[str, Any]:
  """The evaluator's sums over the batch (`outputs`: the evaluator's, evaluation.py);
  uint8 images are normalised with `normalization` first."""
  x = device_input.images(batch, normalization)
  return outputs(model.apply(_variables(params, batch_stats), x, train=False), batch)


def run_eval(eval_fn, params, batch_stats, eval_inp, mesh,
             evaluator: evaluation.Classification) -> dict[str, float]:
  """One exact pass (padded last batch, masked) of `eval_fn` (an eval_step with
  evaluator's `outputs`); returns `evaluator.result()`."""
  batches = device_input.DevicePrefetcher(
      eval_inp.make_eval_iterator(),
      lambda local: shard_lib.global_batch(mesh, {k: local[k] for k in evaluator.keys
                                                  if k in local}))
  try:
    for batch in batches:
      with jax.set_mesh(mesh):
        evaluator.update(eval_fn(params, batch_stats, batch))
  finally:
    batches.close()
  return evaluator.result()


# ----------------------------------------------------------------------------- resume

# The config fields a resume may change (README, "Faults on resume"): evaluation, logging,
# checkpoint cadence, input workers and where data lives, sharding layout, multi-host
# wiring. Every other field (model, data, batch size, schedule, optimiser, seed, ...)
# gives the saved state (params, optimiser moments, step, data position) its meaning, so a
# resume that changes one is refused. A trailing '.' means every field under that group.
RESUME_MAY_CHANGE = (
    "eval_every_epochs", "eval_batch_size", "eval_only", "data.eval_split",
    "data.eval_examples", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "transfer_guard", "data.num_workers", "data.data_dir", "fsdp", "resume", "init_from.",
    "distributed.", "compilation_cache_dir",
)


# Fields added to the configs after runs were started without them, with the value such a
# run was trained with: resuming it keeps that value (a resume must not change the recipe).
RESUME_LEGACY_VALUES = {
    "weight_decay_mask": "no_pos_embed",
}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(recorded: dict, config: ml_collections.ConfigDict) -> list[str]:
  """'field: recorded -> requested' for every field a resume may not change. Fields only
  one side has (added to or removed from the configs since the run started) are not
  compared: the checkpoint's arrays are still checked against the model on restore."""
  now = _flat(json.loads(config.to_json_best_effort()))
  before = _flat(recorded)
  changes = []
  for k in sorted(set(now) & set(before)):
    if k in RESUME_MAY_CHANGE or any(p.endswith(".") and k.startswith(p)
                                    for p in RESUME_MAY_CHANGE):
      continue
    a, b = before[k], now[k]
    if a != b:
      changes.append(f"{k}: {a!r} -> {b!r}")
  return changes


def check_resume_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses (CheckpointMismatchError, one line) to resume workdir's checkpoints with a
  config that changes a field outside RESUME_MAY_CHANGE."""
  path = os.path.join(workdir, "config.json")
  steps = ckpt_lib.list_steps(os.path.join(workdir, "checkpoints"))
  if not steps or not paths.isfile(path):
    return
  recorded = json.loads(paths.read_text(path))
  for field, legacy in RESUME_LEGACY_VALUES.items():
    if field not in recorded and config.get(field, legacy) != legacy:
      logging.warning("%s: the run started before config field %s existed and trained with "
                      "%r; resuming with that value (not %r)", workdir, field, legacy,
                      config[field])
      config[field] = legacy
  changes = config_changes(recorded, config)
  if changes:
    model = recorded.get("model", {}).get("name")
    raise ckpt_lib.CheckpointMismatchError(
        f"{workdir} holds a run of {model} (checkpoints up to step {steps[-1]}) whose "
        f"config differs in fields a resume may not change: {'; '.join(changes)}. Use a new "
        f"--workdir, or the recorded values ({path}); a resume may change only "
        f"{', '.join(f + '*' if f.endswith('.') else f for f in RESUME_MAY_CHANGE)}.")


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  # What `python -m structvit_jax.export` rebuilds the model from: written once the run's
  # state is known to fit it (after a restore or a fresh start), atomically.
  if jax.process_index() == 0:
    metrics_lib.write_atomic(os.path.join(workdir, "config.json"),
                             config.to_json_best_effort(indent=2))


# ----------------------------------------------------------------------------- setup


class _Setup:
  """Everything train and eval share: inputs, model, optimiser, shardings, jitted fns."""

  def __init__(self, config, workdir, devices, train: bool):
    shard_lib.initialize_distributed(config)
    shard_lib.log_topology()
    self.mesh = shard_lib.make_mesh(devices)
    ndev, nproc = self.mesh.devices.size, jax.process_count()
    eval_bs = config.eval_batch_size or config.batch_size
    for name, bs in (("batch_size", config.batch_size), ("eval_batch_size", eval_bs)):
      if bs % ndev:
        raise ValueError(f"config.{name}={bs} must be divisible by the {ndev} devices.")
    if config.batch_size % config.grad_accum_steps or (
        config.batch_size // config.grad_accum_steps) % ndev:
      raise ValueError(f"batch_size {config.batch_size} / grad_accum_steps "
                       f"{config.grad_accum_steps} must be a multiple of {ndev} devices.")
    self.train_inp = (create_input(config, "train", config.batch_size // nproc, config.seed)
                      if train else None)
    self.eval_inp = create_input(config, "eval", eval_bs // nproc, config.seed)
    self.num_classes = self.eval_inp.num_classes
    self.input_shape = tuple(self.eval_inp.input_shape)
    self.model = build_model(config, self.num_classes)
    self.model_name = config.model.name  # the preset, e.g. structvit_tiny (a UniFormer)
    n_train = self.train_inp.num_examples if train else self.eval_inp.num_examples
    self.total_steps, self.steps_per_epoch = train_steps(config, n_train)
    self.schedule = optim.make_schedule(config, self.total_steps, self.steps_per_epoch)
    self.tx = optim.make_optimizer(config, self.schedule)

    init = functools.partial(init_state, model=self.model, tx=self.tx,
                             input_shape=self.input_shape, ema=config.ema_decay > 0)
    rng = jax.random.PRNGKey(config.seed)
    self.abstract_state = jax.eval_shape(init, rng)
    self.shardings = shard_lib.state_shardings(self.abstract_state, self.mesh, config.fsdp)
    self.abstract_sharded = ckpt_lib.abstract_with_shardings(self.abstract_state,
                                                             self.shardings)
    init_fn = jax.jit(init, out_shardings=self.shardings)
    # The trace is eval_shape's (cached); only the XLA compile is new.
    self.init = lambda: init_fn.lower(rng).compile(init_compiler_options())(rng)
    repl = shard_lib.replicated(self.mesh)
    data = shard_lib.batch_sharding(self.mesh)
    self.new_evaluator = lambda: evaluation.evaluator_for(config)
    self.eval_fn = jax.jit(functools.partial(eval_step, model=self.model,
                                             outputs=self.new_evaluator().outputs,
                                             normalization=self.eval_inp.normalization),
                           in_shardings=(self.shardings.params, self.shardings.batch_stats,
                                         data), out_shardings=repl)
    self.train_fn = jax.jit(
        functools.partial(train_step, model=self.model, tx=self.tx, schedule=self.schedule,
                          config=config, num_classes=self.num_classes,
                          normalization=self.train_inp.normalization if train else None),
        in_shardings=(self.shardings, data), out_shardings=(self.shardings, repl),
        donate_argnums=0)
    self.ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      keep=config.keep_checkpoints)

  def compile_train(self, batch: dict[str, jax.Array]) -> None:
    """Compiles the train step for the state's shapes and `batch`'s, ahead of its first
    call, which then finds the program in jit's in-memory cache (no second compile)."""
    with jax.set_mesh(self.mesh):
      self.train_fn.lower(self.abstract_sharded, batch).compile()

  def compile_eval_in_background(self) -> "_Background":
    """Compiles the eval step on a thread (while training steps run), for the shapes of one
    batch of a fresh eval pass (read and dropped); the first evaluation then finds it
    compiled. result() raises a failure of it."""
    def compile_eval():
      it = self.eval_inp.make_eval_iterator()
      try:
        local = next(it)
      finally:
        if hasattr(it, "close"):
          it.close()
      data, nproc = shard_lib.batch_sharding(self.mesh), jax.process_count()
      keys = self.new_evaluator().keys
      batch = {k: jax.ShapeDtypeStruct((v.shape[0] * nproc, *v.shape[1:]), np.asarray(v).dtype,
                                       sharding=data)
               for k, v in local.items() if k in keys}
      with jax.set_mesh(self.mesh):
        self.eval_fn.lower(self.abstract_sharded.params, self.abstract_sharded.batch_stats,
                           batch).compile()
    return _Background(compile_eval, "eval compile")

  def log_model_size(self, writer: metrics_lib.MetricWriter) -> None:
    from structvit_jax import flops
    n_params = flops.count_params(self.abstract_state.params)
    gmacs = None
    try:
      gmacs = flops.count_model_macs(self.model, self.input_shape)["total"] / 1e9
    except Exception as e:  # the count is informative only; never block training on it
      logging.warning("GFLOPs count failed: %s", e)
    logging.info("Model %s (%s): %.3f M params, %s GFLOPs (MACs) per example",
                 self.model_name, type(self.model).__name__, n_params / 1e6,
                 "?" if gmacs is None else f"{gmacs:.3f}")
    writer.scalars(0, {"model/params_M": n_params / 1e6,
                       **({} if gmacs is None else {"model/gflops": gmacs})})

  def _check_fits(self, config, directory: str):
    """A Checkpointer.restore check: the checkpoint's params/batch_stats tree and shapes
    are those of config's model, else one CheckpointMismatchError naming the difference."""
    def check(step, metadata):
      diff = ckpt_lib.tree_difference(
          {"params": self.abstract_state.params, "batch_stats": self.abstract_state.batch_stats},
          {"params": metadata["params"], "batch_stats": metadata.get("batch_stats", {})},
          what=f"the requested {config.model.name}", where=f"checkpoint step {step}")
      if diff:
        raise ckpt_lib.CheckpointMismatchError(
            f"checkpoint step {step} in {directory} was not written by the requested model "
            f"{config.model.name}: {diff}")
    return check

  def restore_or_init(self, config, data_iter) -> TrainState:
    """Workdir checkpoint -> config.resume -> config.init_from.checkpoint -> scratch.

    A damaged newest checkpoint falls back to the newest step that restores (Checkpointer
    .restore); a checkpoint of another model raises CheckpointMismatchError."""
    if self.ckpt.latest_step() is not None:
      return self.ckpt.restore(self.abstract_sharded, data_iter=data_iter,
                               check=self._check_fits(config, self.ckpt.directory))[0]
    if config.resume:
      src = ckpt_lib.Checkpointer(config.resume, read_only=True)
      try:
        state = src.restore(self.abstract_sharded, data_iter=data_iter,
                            check=self._check_fits(config, config.resume))[0]
      finally:
        src.close()
      return state
    state = self.init()
    init_from = config.init_from
    if init_from.checkpoint:
      # A training checkpoint dir, an export or an official .pth; weights.fit inflates 2D
      # kernels, resizes TimeSformer embeddings, re-initialises the head (drop_head) and puts
      # StructSA kernels at the identity centre tap for a UniFormer source.
      from structvit_jax import weights
      abstract = {"params": self.abstract_state.params,
                  "batch_stats": self.abstract_state.batch_stats}
      loaded = weights.init_variables_from(
          init_from.checkpoint, abstract,
          lambda: {"params": state.params, "batch_stats": state.batch_stats},
          inflate_mode=init_from.get("inflate", ""), drop_head=init_from.get("drop_head", False))
      # Host numpy -> the trainer's shardings (every process loaded the same values).
      host = lambda t: jax.tree.map(np.asarray, t)
      params = jax.device_put(host(loaded["params"]), self.shardings.params)
      batch_stats = jax.device_put(host(loaded["batch_stats"]), self.shardings.batch_stats)
      ema = params if config.ema_decay > 0 else state.ema_params
      state = state.replace(params=params, batch_stats=batch_stats,
                            ema_params=jax.tree.map(jnp.copy, ema))
      logging.info("Initialised params from %s (inflate=%r, drop_head=%s)",
                   init_from.checkpoint, init_from.get("inflate", ""),
                   init_from.get("drop_head", False))
    return state


def _eval_and_log(setup, state, config, writer, step) -> dict[str, float]:
  results = {}
  variants = [("eval", state.params)]
  if config.ema_decay > 0:
    variants.append(("eval_ema", state.ema_params))
  for prefix, params in variants:
    m = run_eval(setup.eval_fn, params, state.batch_stats, setup.eval_inp, setup.mesh,
                 setup.new_evaluator())
    results.update({f"{prefix}/{k}": v for k, v in m.items()})
    metrics_lib.log_console(evaluation.console_line(prefix, step, m))
  bad = [f"{k}={v}" for k, v in results.items()
         if isinstance(v, (int, float, np.number)) and not math.isfinite(float(v))]
  if bad:  # not recorded: eval_results.jsonl and TensorBoard keep finite results only
    raise FloatingPointError(
        f"Non-finite evaluation at step {step}: {', '.join(bad)} (not recorded in "
        f"{os.path.join(writer.workdir, 'eval_results.jsonl')}); the checkpoint of step "
        f"{step} is kept. Stopping.")
  writer.scalars(step, {k: v for k, v in results.items()
                        if not k.endswith(("count", "views"))})
  writer.eval_record(step, results)
  return results


# ----------------------------------------------------------------------------- loops


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: list[jax.Device] | None = None) -> tuple[TrainState, dict]:
  """Trains (resuming if possible) and evaluates; returns (final state, last eval metrics).

  devices: the devices of the mesh (default: all); tests use a subset.
  """
  check_resume_config(config, workdir)
  startup = _StartupTimes()
  setup = _Setup(config, workdir, devices, train=True)
  startup.mark("setup")
  train_iter = setup.train_inp.iterator
  read = lambda: device_input.DevicePrefetcher(
      train_iter, lambda b: shard_lib.global_batch(setup.mesh, _train_batch(b)))
  batches, first_batch = None, None  # the global batches, read ahead on a thread
  try:
    if setup.ckpt.latest_step() is None and not config.resume:
      batches = read()
      state, first_batch = _init_overlapped(setup, config, batches, startup)
    else:
      state = setup.restore_or_init(config, train_iter)
      startup.mark("restore")
  except BaseException:
    setup.ckpt.close()
    if batches is not None:
      batches.close()
    elif hasattr(train_iter, "close"):
      train_iter.close()
    raise
  _write_config(config, workdir)
  writer = metrics_lib.MetricWriter(workdir)
  setup.log_model_size(writer)
  startup.mark("model size")
  step = int(jax.device_get(state.step))
  total = setup.total_steps
  eval_every = max(1, int(round(config.eval_every_epochs * setup.steps_per_epoch)))
  logging.info("Training steps %d..%d (%d/epoch, global batch %d); eval every %d steps",
               step, total, setup.steps_per_epoch, config.batch_size, eval_every)
  sigterm = ckpt_lib.SigtermFlag()
  progress = metrics_lib.Progress(total, config.batch_size, step)
  history: list[dict] = []        # host metrics since the last log line
  bad = evaluation.BadCount()     # unreadable examples replaced, per log line and in all
  pending = None                  # (step, device metrics): fetched one step late
  eval_results: dict = {}
  compiled = False
  eval_compile = None             # the eval step's compile on a thread, until the first eval

  def fetch(item):
    # Fetching one step late keeps the device busy; the check still names the step.
    s, m = item
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    bad.add(m)
    if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
      raise FloatingPointError(
          f"Non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) at step {s}. "
          "Stopping; " + (f"the last good checkpoint (step {last}) in "
                          f"{setup.ckpt.directory} is kept."
                          if (last := setup.ckpt.latest_step()) is not None
                          else "no checkpoint was saved before it."))
    history.append(m)

  def flush():
    nonlocal pending
    if pending is not None:
      fetch(pending)
      pending = None

  def save(s):
    flush()  # never checkpoint a state that came from a non-finite loss
    # The input position after the last batch the steps took, not after the read-ahead.
    setup.ckpt.save(s, state, batches)

  # The step dispatch runs under a transfer guard ('disallow' by default): an implicit
  # device->host or host->device transfer there (a host sync, or a numpy input that makes
  # every step re-upload) raises instead of silently stalling the pipeline. The metrics are
  # fetched one step late, outside the guard, with an explicit jax.device_get.
  guard = config.get("transfer_guard", "disallow")
  try:
    # The next batches are read and put on the devices while the current step runs.
    if batches is None:
      batches = read()
    while step < total:
      t0 = time.perf_counter()  # time the step waits for its batch (on the devices)
      batch = next(batches) if first_batch is None else first_batch
      first_batch = None
      progress.add_data_time(time.perf_counter() - t0)
      # The mesh in context lets kernels that must be shard_mapped (Pallas flash attention on
      # a multi-chip TPU, models/attention.py) see it at trace time.
      t1 = time.perf_counter()
      with (jax.set_mesh(setup.mesh), jax.transfer_guard_device_to_host(guard),
            jax.transfer_guard_host_to_device(guard)):
        state, m = setup.train_fn(state, batch)
      if not compiled:  # the first call compiles: keep that out of step time and ETA
        jax.block_until_ready(m)
        progress.add_pause(time.perf_counter() - t1)
        compiled = True
        startup.first_step(t1 - t0, time.perf_counter() - t1)
        if _usable_cores() > 1:  # on one core the thread would only contend with the steps
          eval_compile = setup.compile_eval_in_background()
      step += 1
      flush()
      pending = (step, m)
      preempted = (sigterm.is_set() if jax.process_count() == 1
                   else setup.ckpt.reached_preemption(step))
      if step % config.log_every_steps == 0 or step == total:
        flush()
        avg = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
        avg["lr"] = history[-1]["lr"]
        history.clear()
        avg.update(progress.tick(step), **bad.take())
        metrics_lib.log_console(metrics_lib.console_line(step, total, avg) + bad.console())
        writer.scalars(step, {f"train/{k}": v for k, v in avg.items()})
      if preempted:
        save(step)
        setup.ckpt.wait()
        logging.warning("Preempted: saved step %d; exiting.", step)
        return state, eval_results
      if step % config.checkpoint_every_steps == 0 or step == total:
        progress.pause()
        save(step)
        progress.resume()
      if step % eval_every == 0 or step == total:
        progress.pause()
        eval_compile = eval_compile and eval_compile.result()  # raises its failure, once
        eval_results = _eval_and_log(setup, state, config, writer, step)
        progress.resume()
    missing = not eval_results and not any(r.get("step") == step
                                           for r in metrics_lib.read_eval_records(workdir))
    if jax.process_count() > 1:  # process 0's file decides: every process must evaluate
      from jax.experimental import multihost_utils
      missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
    if missing:
      # A finished run killed during its final evaluation: run it now.
      logging.info("Step %d has no evaluation in %s: evaluating.", step,
                   os.path.join(workdir, "eval_results.jsonl"))
      eval_results = _eval_and_log(setup, state, config, writer, step)
    return state, eval_results
  finally:
    sigterm.restore_handler()
    setup.ckpt.close()
    writer.close()
    if batches is not None:
      batches.close()  # closes train_iter
    elif hasattr(train_iter, "close"):
      train_iter.close()


def init_compiler_options() -> dict[str, Any]:
  """XLA options for the init program. On CPU its compile is mostly LLVM optimising one
  threefry per parameter (none of it depends on the input size); backend level 1 instead of
  the default 2 cuts it about 2x and gives bit-identical parameters
  (tests/test_fast_init.py; docs/platform_notes.md). Other backends, or XLA's cheap mode
  already on: XLA's defaults."""
  if jax.default_backend() != "cpu" or jax.config.read("jax_disable_most_optimizations"):
    return {}
  return {"xla_backend_optimization_level": 1}


class _Background:
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


def _usable_cores() -> int:
  if hasattr(os, "sched_getaffinity"):  # the cores this process may run on (taskset, cgroups)
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _init_overlapped(setup: _Setup, config, batches, startup: "_StartupTimes"):
  """A fresh start: the init (and config.init_from) runs on a thread while this one reads the
  first of `batches` and compiles the train step for it (it needs only the state's shapes);
  XLA compiles release the GIL, so the two overlap on 2+ cores (on one core, where the
  threads would only contend, the init runs after the compile). Returns (state, the first
  batch). An error on either side is raised here."""
  init = lambda: setup.restore_or_init(config, None)
  job = _Background(init, "init") if _usable_cores() > 1 else None
  where = " (init on a thread)" if job else ""
  first = next(batches)
  startup.mark("first batch" + where)
  setup.compile_train(first)
  startup.mark("train-step compile" + where)
  state = job.result() if job else init()
  startup.mark("rest of the init" if job else "init")
  return state, first


class _StartupTimes:
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


def _train_batch(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # 'bad', 'erase' (random-erasing boxes), the token-labeling targets: optional
  return {k: b[k] for k in ("image", "label", "bad", "erase", *token_labeling.KEYS) if k in b}


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             devices: list[jax.Device] | None = None) -> dict[str, float]:
  """Evaluates the newest checkpoint in workdir (else config.resume) and its EMA."""
  setup = _Setup(config, workdir, devices, train=False)
  writer = metrics_lib.MetricWriter(workdir)
  source = setup.ckpt
  if source.latest_step() is None:
    if not config.resume:
      setup.ckpt.close()
      raise FileNotFoundError(f"No checkpoint in {setup.ckpt.directory} and no config.resume.")
    source = ckpt_lib.Checkpointer(config.resume, read_only=True)
  try:  # a damaged newest step: the newest that restores, with a warning (as in training)
    state, step = source.restore(setup.abstract_sharded, check=setup._check_fits(config, source.directory))
  except BaseException:
    setup.ckpt.close()
    raise
  finally:
    if source is not setup.ckpt:
      source.close()
  try:
    return _eval_and_log(setup, state, config, writer, step)
  finally:
    setup.ckpt.close()
    writer.close()
