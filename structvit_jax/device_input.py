"""The device side of the input: uint8 batches are normalised (and randomly erased) inside
the jitted step, and a background thread puts the next batches on the devices while the
current step runs.

The trainer's input (`data.create_input(..., uint8=True)`) ships uint8 images/clips, a
quarter of float32's bytes, from the grain workers to the host and on to the devices. The
normalisation constants are the dataset's (`Input.normalization`, from its `Normalize`
transform) and reach the jitted step as constants; `normalize` computes exactly what the
host-side `Normalize` computes. Random erasing (timm: N(0, 1) noise in normalised space)
has its box drawn in the workers (`ops.EraseBox`, the same draws as `RandomErasing`)
and filled here (`erase`): docs/input_pipeline.md.
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

Normalization = tuple[Sequence[float], Sequence[float]]  # (mean, std), in [0, 1] units


def normalize(images: jax.Array, normalization: Normalization) -> jax.Array:
  """uint8 [..., C] -> float32 (x/255 - mean) / std, with the constants and the order of
  operations of the host-side `ops.Normalize`."""
  from structvit_jax.data.ops import Normalize  # the one owner of the formula
  op = Normalize(*normalization)
  return (images.astype(jnp.float32) - op.mean) * op.scale


def erase(rng: jax.Array, images: jax.Array, boxes: jax.Array) -> jax.Array:
  """Fills box [top, left, h, w] of each example (images [B, ..., H, W, C], boxes int32
  [B, 4]; h = 0: none) with N(0, 1) noise: the same box on every frame of a clip, fresh
  noise per pixel, channel and frame (timm 'pixel' mode; SlowFast's cube erasing)."""
  h, w = images.shape[-3], images.shape[-2]
  top, left, bh, bw = (boxes[:, i, None] for i in range(4))
  ys, xs = jnp.arange(h)[None], jnp.arange(w)[None]
  in_y = (ys >= top) & (ys < top + bh)                        # [B, H]
  in_x = (xs >= left) & (xs < left + bw)                      # [B, W]
  box = in_y[:, :, None] & in_x[:, None, :]                   # [B, H, W]
  box = box.reshape(box.shape[0], *(1,) * (images.ndim - 4), h, w, 1)
  noise = jax.random.normal(rng, images.shape, images.dtype)
  return jnp.where(box, noise, images)


def images(batch: dict[str, jax.Array], normalization: Normalization | None,
           rng: jax.Array | None = None) -> jax.Array:
  """The model input of `batch`: float images as they are; uint8 ones normalised with
  `normalization`, then erased where the batch has `erase` boxes (rng: the noise)."""
  x = batch["image"]
  if x.dtype == jnp.uint8:
    if normalization is None:
      raise ValueError("a uint8 batch needs the normalisation of its dataset "
                       "(data.Input.normalization)")
    x = normalize(x, normalization)
  if "erase" in batch:
    if rng is None:
      raise ValueError("a batch with random-erasing boxes needs an rng for the noise")
    x = erase(rng, x, batch["erase"])
  return x


class DevicePrefetcher:
  """Iterates `put(next(iterator))` from a background thread, `depth` batches ahead, so
  the next batch's host->device copy overlaps the current step. Batches come in the
  iterator's order; an error in the thread is raised by the `next()` that would have
  returned the batch.

  For checkpoints, `get_state()` is the wrapped iterator's state after the last batch
  returned by `next()` (not after the ones read ahead), in the bytes grain's
  CheckpointSave writes for a DatasetIterator. Restore the wrapped iterator before
  wrapping it: the thread starts reading at once.
  """

  _END = object()

  def __init__(self, iterator: Iterator[Any], put: Callable[[Any], Any], depth: int = 2):
    self._it, self._put = iterator, put
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._state = self._read_state()
    self._thread = threading.Thread(target=self._run, name="device_prefetch", daemon=True)
    self._thread.start()

  def _read_state(self) -> Any:
    get = getattr(self._it, "get_state", None)
    return get() if get is not None else None

  def _run(self) -> None:
    try:
      while not self._stop.is_set():
        self._offer((self._put(next(self._it)), self._read_state()))
    except BaseException as e:  # StopIteration included: handed to the consumer
      self._offer((self._END, e))

  def _offer(self, item) -> None:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        pass

  def __iter__(self) -> "DevicePrefetcher":
    return self

  def __next__(self) -> Any:
    if self._stop.is_set():
      raise StopIteration
    batch, state = self._queue.get()
    if batch is self._END:
      self._stop.set()
      raise state
    self._state = state
    return batch

  def get_state(self) -> bytes:
    return json.dumps(self._state, indent=4).encode()

  def close(self) -> None:
    """Stops the thread (after the batch it is reading, if any) and closes the iterator."""
    self._stop.set()
    try:
      while True:
        self._queue.get_nowait()
    except queue.Empty:
      pass
    self._thread.join(timeout=60)
    if hasattr(self._it, "close"):
      self._it.close()

