"""The training state and the jitted steps built from a config: TrainState, the model
(`build_model`), `init_state`, `train_step`, `eval_step`, `run_eval`, and the functions that
jit them over a ('data',) mesh (`make_init`, `jit_train_step`, `jit_eval_step`). The trainer
(train.py), the benchmarks and export.py all build theirs here.
"""

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from structvit_jax import device_input
from structvit_jax import evaluation
from structvit_jax import mixup as mixup_lib
from structvit_jax import optim
from structvit_jax import sharding as shard_lib
from structvit_jax import token_label_loss


@flax.struct.dataclass
class TrainState:
  step: jax.Array         # int32 scalar: number of optimiser updates done
  params: Any             # fp32
  batch_stats: Any        # BatchNorm running statistics ({} for models without BN)
  opt_state: Any
  ema_params: Any         # EMA of params ({} when config.ema_decay == 0)
  rng: jax.Array          # base key; each step uses fold_in(rng, step)


def model_kwargs(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
  """The get_model overrides of config's model (JSON-serialisable: dtype as a string); every
  zoo model has `dtype` and `remat` fields."""
  return {**config.model.kwargs.to_dict(), "num_classes": num_classes, "dtype": config.dtype,
          "remat": config.remat}


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  from structvit_jax.models import get_model
  return get_model(config.model.name, **model_kwargs(config, num_classes))


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


def init_compiler_options() -> dict[str, Any]:
  """XLA options for the init program. On CPU its compile is mostly LLVM optimising one
  threefry per parameter (none of it depends on the input size); backend level 1 instead of
  the default 2 cuts it about 2x and gives bit-identical parameters
  (tests/test_fast_init.py; docs/platform_notes.md). Other backends, or XLA's cheap mode
  already on: XLA's defaults."""
  if jax.default_backend() != "cpu" or jax.config.read("jax_disable_most_optimizations"):
    return {}
  return {"xla_backend_optimization_level": 1}


def make_init(config: ml_collections.ConfigDict, model: nn.Module,
              tx: optax.GradientTransformation, input_shape: tuple[int, ...],
              mesh: jax.sharding.Mesh, seed: int
              ) -> tuple[TrainState, TrainState, Callable[[], TrainState]]:
  """(abstract state, its shardings, init() -> the sharded state of PRNGKey(seed))."""
  init = functools.partial(init_state, model=model, tx=tx, input_shape=input_shape,
                           ema=config.ema_decay > 0)
  rng = jax.random.PRNGKey(seed)
  abstract_state = jax.eval_shape(init, rng)
  shardings = shard_lib.state_shardings(abstract_state, mesh, config.fsdp)
  init_fn = jax.jit(init, out_shardings=shardings)
  # The trace is eval_shape's (cached); only the XLA compile is new.
  return (abstract_state, shardings,
          lambda: init_fn.lower(rng).compile(init_compiler_options())(rng))


def jit_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                   tx: optax.GradientTransformation, schedule: optax.Schedule,
                   num_classes: int, normalization: device_input.Normalization | None,
                   shardings: TrainState, mesh: jax.sharding.Mesh) -> Callable:
  """train_step jitted over `mesh`: the state donated, the batch split along 'data'."""
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config,
                        num_classes=num_classes, normalization=normalization),
      in_shardings=(shardings, shard_lib.batch_sharding(mesh)),
      out_shardings=(shardings, shard_lib.replicated(mesh)), donate_argnums=0)


def jit_eval_step(model: nn.Module, normalization: device_input.Normalization | None,
                  shardings: TrainState, mesh: jax.sharding.Mesh,
                  outputs: Callable = evaluation.Classification.outputs) -> Callable:
  """eval_step (params, batch_stats, batch) -> the evaluator's sums, jitted over `mesh`."""
  return jax.jit(functools.partial(eval_step, model=model, outputs=outputs,
                                   normalization=normalization),
                 in_shardings=(shardings.params, shardings.batch_stats,
                               shard_lib.batch_sharding(mesh)),
                 out_shardings=shard_lib.replicated(mesh))


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
  token_labels = token_label_loss.enabled(batch)
  if token_labels:  # dense targets, MixToken, aux loss: token_label_loss.py
    images, targets = token_label_loss.inputs(mix_rng, batch, num_classes, config)
  else:
    images, targets = mixup_lib.mixup_cutmix(
        mix_rng, batch["image"], batch["label"], num_classes,
        mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
        switch_prob=config.mixup_switch_prob, label_smoothing=config.label_smoothing)

  def loss_fn(params, batch_stats, x, t, rng):
    apply = functools.partial(model.apply, _variables(params, batch_stats), train=True,
                              rngs={"dropout": rng}, mutable=["batch_stats"])
    if token_labels:
      loss, logits, updates = token_label_loss.loss(apply, x, t, config)
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
