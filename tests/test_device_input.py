"""uint8 batches normalised (and randomly erased) on the device, and the device prefetch
thread: the same numbers as the host-side float path, the same batches in the same order."""

import functools
import json
import pathlib
import threading
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structvit_jax import device_input, optim, train, train_state
from structvit_jax.config_utils import import_sibling
from structvit_jax.data import create_input, ops, spec

REPO = pathlib.Path(__file__).resolve().parents[1]
FAST_COMPILES = True  # the train-step compiles of the loss test dominate (conftest.py)


def _demo(**fields):
  c = import_sibling(str(REPO / "configs" / "demo.py"), "demo").get_config(
      "image_size=16,train_examples=64")
  for k, v in fields.items():
    c[k] = v
  return c


@pytest.mark.parametrize("stats, shape", [
    ((spec.IMAGENET_MEAN, spec.IMAGENET_STD), (3, 8, 8, 3)),
    ((spec.VIDEO_MEAN, spec.VIDEO_STD), (2, 4, 8, 8, 3))])
def test_device_normalization_equals_host(stats, shape):
  x = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
  x.flat[:2] = 0, 255  # both ends of the range
  host = ops.Normalize(*stats).map({"image": x})["image"]
  dev = jax.jit(lambda a: device_input.normalize(a, stats))(x)
  assert dev.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(dev), host, rtol=0, atol=1e-6)


def test_uint8_input_is_the_float_input_before_normalisation():
  c = _demo()
  floats = create_input(c, "train", 8, seed=1)
  ints = create_input(c, "train", 8, seed=1, uint8=True)
  assert floats.normalization is None
  assert ints.normalization == (spec.IMAGENET_MEAN, spec.IMAGENET_STD)
  norm = jax.jit(functools.partial(device_input.normalize, normalization=ints.normalization))
  for _ in range(2):  # random flips included
    f, u = next(floats.iterator), next(ints.iterator)
    assert u["image"].dtype == np.uint8 and u["image"].nbytes * 4 == f["image"].nbytes
    np.testing.assert_array_equal(u["label"], f["label"])
    np.testing.assert_allclose(np.asarray(norm(u["image"])), f["image"], rtol=0, atol=1e-6)
  e = next(create_input(c, "eval", 8, uint8=True).make_eval_iterator())
  assert e["image"].dtype == np.uint8 and e["mask"].all()


def test_erasing_on_device_uses_the_host_box():
  clip = np.zeros((3, 16, 20, 3), np.float32)  # a clip: one box through every frame
  host_op, box_op = ops.RandomErasing(1.0), ops.device_side(
      [ops.RandomErasing(1.0)])[0][0]
  assert isinstance(box_op, ops.EraseBox)
  boxes, host_masks = [], []
  for seed in range(6):
    host = host_op.random_map({"image": clip}, np.random.default_rng(seed))["image"]
    host_masks.append(host != 0)
    boxes.append(box_op.random_map({"image": clip}, np.random.default_rng(seed))["erase"])
  boxes = np.stack(boxes)
  assert boxes.dtype == np.int32 and (boxes[:, 2] > 0).all()
  boxes[0] = 0  # h = w = 0: nothing erased
  host_masks[0][:] = False
  batch = {"image": jnp.asarray(np.broadcast_to(clip, (6, *clip.shape))),
           "erase": jnp.asarray(boxes)}
  out = np.asarray(jax.jit(device_input.images, static_argnums=1)(
      batch, None, jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(out != 0, np.stack(host_masks))
  noise = out[1:][out[1:] != 0]
  assert abs(noise.mean()) < 0.1 and 0.9 < noise.std() < 1.1  # N(0, 1)
  assert not np.array_equal(out[1, 0], out[1, 1])  # fresh noise per frame
  none = ops.EraseBox(0.0).random_map({"image": clip}, np.random.default_rng(0))
  np.testing.assert_array_equal(none["erase"], [0, 0, 0, 0])


def test_uint8_batches_give_the_float_loss():
  # DeiT (no BatchNorm) compiles fastest; mixup + cutmix run after the normalisation.
  c = _demo(batch_size=8, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
  c.model.name = "deit_tiny"
  floats = next(create_input(c, "train", 8, seed=3).iterator)
  inp = create_input(c, "train", 8, seed=3, uint8=True)
  ints = next(inp.iterator)
  model = train_state.build_model(c, inp.num_classes)
  schedule = optim.make_schedule(c, 10, 8)
  tx = optim.make_optimizer(c, schedule)
  state = jax.jit(lambda rng: train_state.init_state(rng, model, tx, inp.input_shape,
                                                     ema=False))(jax.random.PRNGKey(0))
  losses = []
  for batch, norm in ((floats, None), (ints, inp.normalization)):
    step = jax.jit(functools.partial(train_state.train_step, model=model, tx=tx, schedule=schedule,
                                     config=c, num_classes=inp.num_classes,
                                     normalization=norm))
    _, m = step(state, {k: batch[k] for k in ("image", "label")})
    losses.append(float(m["loss"]))
  assert np.isfinite(losses[0])
  assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def _range_iterator(n: int):
  return iter(grain.MapDataset.range(n).map(lambda i: {"x": np.int64(i)}).to_iter_dataset())


def test_prefetch_yields_the_same_batches_in_order_and_the_consumed_state():
  calls = []
  put = lambda b: calls.append(threading.current_thread().name) or b["x"] * 10
  p = device_input.DevicePrefetcher(_range_iterator(7), put, depth=2)
  first = [next(p) for _ in range(3)]
  time.sleep(0.2)  # the thread reads ahead meanwhile, 2 deep
  assert first == [0, 10, 20] and set(calls) == {"device_prefetch"}
  ref = _range_iterator(7)
  for _ in range(3):
    next(ref)
  # The state after the 3 batches taken, not after those read ahead.
  assert json.loads(p.get_state()) == ref.get_state()
  resumed = _range_iterator(7)
  resumed.set_state(json.loads(p.get_state()))
  assert int(next(resumed)["x"]) == 3
  assert list(p) == [30, 40, 50, 60]
  with pytest.raises(StopIteration):
    next(p)
  p.close()


def test_prefetch_raises_errors_in_order_and_closes_promptly():
  def bad(b):
    if b["x"] == 2:
      raise RuntimeError("unreadable batch 2")
    return int(b["x"])
  p = device_input.DevicePrefetcher(_range_iterator(5), bad)
  assert [next(p), next(p)] == [0, 1]
  with pytest.raises(RuntimeError, match="unreadable batch 2"):
    next(p)
  p.close()
  full = device_input.DevicePrefetcher(_range_iterator(100), lambda b: b, depth=1)
  next(full)
  time.sleep(0.2)  # the thread now waits on the full queue
  t = time.perf_counter()
  full.close()
  assert time.perf_counter() - t < 5 and not full._thread.is_alive()


def test_checkpoint_holds_the_position_of_the_batches_the_steps_took(tmp_path, monkeypatch):
  # A stand-in step (no model compile): the point is the input position saved with step 3
  # while the prefetch thread has read further ahead.
  taken = []

  def step(state, batch, **kw):
    del kw
    taken.append(batch["image"])
    zero = jnp.zeros((), jnp.float32)
    return state.replace(step=state.step + 1), dict(loss=zero, grad_norm=zero, lr=zero,
                                                    top1=zero, top5=zero)

  monkeypatch.setattr(train_state, "train_step", step)
  monkeypatch.setattr(train, "_eval_and_log", lambda *a: {"eval/top1": 0.0})
  c = _demo(batch_size=8, num_train_steps=3, checkpoint_every_steps=3, log_every_steps=1)
  c.model.name = "deit_tiny"
  train.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])
  saved = json.loads((tmp_path / "checkpoints" / "3" / "data_iter" /
                      "process_0-of-1.json").read_text())
  ref = create_input(c, "train", 8, seed=c.seed, uint8=True).iterator
  for _ in range(3):
    next(ref)
  assert saved == json.loads(json.dumps(ref.get_state()))
  assert len(taken) == 1 and taken[0].dtype == jnp.uint8  # traced once, on uint8 batches
