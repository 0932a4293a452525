"""The trainer's start-up: the init program's XLA options keep the parameters bit-identical;
the init overlapped with the train-step compile (startup.init_overlapped) and the eval
step's background compile raise a failure in the caller; a compile ahead of time leaves
nothing for the first call to compile."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from structvit_jax import compile_cache
from structvit_jax import sharding as shard_lib
from structvit_jax import startup
from structvit_jax import train_state
from structvit_jax.models import get_model
from structvit_jax.models.structsa import StructSA, StructSAConfig


def _trainer_init(name, input_shape):
  """train_state.init_state of a zoo model (params, optimiser state, ...)."""
  model = get_model(name, num_classes=5, depth=1)  # one block: fewer parameters to compile
  return functools.partial(train_state.init_state, model=model, tx=optax.sgd(0.1),
                           input_shape=input_shape, ema=False)


def _structsa_init(rng):
  """One StructSA layer (U^K pattern detectors, U^V context aggregators, qkv, proj) on a
  video token grid: a whole StructViT has ~100 parameter tensors and its default-level
  compile alone takes ~40 s, too long for CI."""
  layer = StructSA(num_heads=2, structsa=StructSAConfig(d=4, init_noise=0.5))
  return layer.init(rng, jnp.zeros((1, 2, 4, 4, 16)))


@pytest.mark.parametrize("case", ["deit_tiny", "timesformer_tiny", "structsa"])
def test_init_options_give_bit_identical_params(case):
  """_Setup.init's program (init_compiler_options) == jax.jit's defaults, bit for bit: a
  DeiT on images, a TimeSformer on clips, a StructSA layer (U^K, U^V) on a video grid."""
  if not train_state.init_compiler_options():
    pytest.skip("XLA's defaults on this backend: nothing to compare")
  init = {"deit_tiny": lambda: _trainer_init("deit_tiny", (16, 16, 3)),
          "timesformer_tiny": lambda: _trainer_init("timesformer_tiny", (4, 32, 32, 3)),
          "structsa": lambda: _structsa_init}[case]()
  rng = jax.random.PRNGKey(3)
  fast = jax.jit(init).lower(rng).compile(train_state.init_compiler_options())(rng)
  ref = jax.jit(init)(rng)
  fast, ref = jax.device_get((fast, ref))
  fast, ref = (getattr(t, "params", t) for t in (fast, ref))
  assert jax.tree.structure(fast) == jax.tree.structure(ref)
  for path, a, b in zip(jax.tree_util.tree_flatten_with_path(fast)[0],
                        jax.tree.leaves(fast), jax.tree.leaves(ref)):
    assert a.dtype == b.dtype and a.shape == b.shape, path[0]
    assert np.array_equal(a, b), jax.tree_util.keystr(path[0])
  assert any(np.std(a) > 0 for a in jax.tree.leaves(fast))  # random values were compared


class _FakeSetup:
  """What init_overlapped uses of a _Setup: restore_or_init (on the thread), compile_train."""

  def __init__(self, init_error=None, compile_error=None):
    self.init_error, self.compile_error = init_error, compile_error
    self.compiled_for = None

  def restore_or_init(self, config, data_iter):
    assert data_iter is None  # a fresh start restores no data position
    if self.init_error:
      raise self.init_error
    return "state"

  def compile_train(self, batch):
    if self.compile_error:
      raise self.compile_error
    self.compiled_for = batch


@pytest.fixture(params=[2, 1], ids=["thread", "one_core"])
def cores(request, monkeypatch):
  """The init on a thread (2+ usable cores) or after the train-step compile (one core)."""
  monkeypatch.setattr(startup, "usable_cores", lambda: request.param)
  return request.param


def test_init_overlapped_returns_state_and_first_batch(cores):
  setup = _FakeSetup()
  batches = iter([{"image": 1}, {"image": 2}])
  state, first = startup.init_overlapped(setup, None, batches, startup.StartupTimes())
  assert (state, first, setup.compiled_for) == ("state", {"image": 1}, {"image": 1})
  assert next(batches) == {"image": 2}  # only the first batch was taken


@pytest.mark.parametrize("where", ["init", "compile"])
def test_init_overlapped_raises_errors_in_the_caller(where, cores):
  error = RuntimeError(f"{where} failed: out of memory")
  setup = (_FakeSetup(init_error=error) if where == "init"
           else _FakeSetup(compile_error=error))
  with pytest.raises(RuntimeError, match=f"^{where} failed: out of memory$") as e:
    startup.init_overlapped(setup, None, iter([{"image": 1}]), startup.StartupTimes())
  assert e.value is error
  if where == "init":  # the traceback (the thread's) names the failing call
    assert any(f.name == "restore_or_init" for f in e.traceback)


def test_background_result():
  assert startup.Background(lambda: 7, "t").result() == 7
  with pytest.raises(KeyError, match="k"):
    startup.Background(lambda: {}["k"], "t").result()


def _eval_setup(make_eval_iterator):
  """What compile_eval_in_background uses of a _Setup, around a one-device eval step."""
  mesh = shard_lib.make_mesh(jax.devices()[:1])
  repl = shard_lib.replicated(mesh)
  eval_fn = jax.jit(lambda params, batch_stats, batch: params["w"] * batch["image"].sum(),
                    in_shardings=(repl, repl, shard_lib.batch_sharding(mesh)),
                    out_shardings=repl)
  abstract = types.SimpleNamespace(
      params={"w": jax.ShapeDtypeStruct((), jnp.float32, sharding=repl)}, batch_stats={})
  return types.SimpleNamespace(
      mesh=mesh, eval_fn=eval_fn, abstract_sharded=abstract,
      eval_inp=types.SimpleNamespace(make_eval_iterator=make_eval_iterator),
      new_evaluator=lambda: types.SimpleNamespace(keys=("image", "mask")))


def test_eval_compile_in_background_then_the_eval_compiles_nothing():
  local = {"image": np.ones((4, 3), np.uint8), "mask": np.ones((4,), bool),
           "unused": np.zeros((4, 7), np.float32)}
  setup = _eval_setup(lambda: iter([local]))
  compile_cache._listen()
  startup.compile_eval_in_background(setup).result()
  before = compile_cache.counts()["programs"]
  assert before >= 1  # the background compile was counted
  batch = shard_lib.global_batch(setup.mesh, {k: local[k] for k in ("image", "mask")})
  params = {"w": jax.device_put(np.float32(2), shard_lib.replicated(setup.mesh))}
  with jax.set_mesh(setup.mesh):
    out = setup.eval_fn(params, {}, batch)
  assert float(out) == 24.0
  assert compile_cache.counts()["programs"] == before  # found compiled


def test_eval_compile_in_background_raises_its_failure():
  def unreadable():
    raise OSError("eval split unreadable: /data/val")
  job = startup.compile_eval_in_background(_eval_setup(unreadable))
  with pytest.raises(OSError, match="^eval split unreadable: /data/val$"):
    job.result()
