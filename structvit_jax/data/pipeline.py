"""Input pipeline assembly: a random-access source -> grain MapDataset -> per-process batches.

Train: seeded shuffle, reshuffled every epoch -> transforms (per-example RNG keyed by the
position in the global stream) -> local batches -> this process's `[process_index::
process_count]`. Global step t is stream positions [t*B, (t+1)*B): the global batch,
augmentations included, is the same for any number of processes. The grain iterator's
state is saved in the trainer's checkpoints. Eval: the split is padded (wrapping around,
`mask` marks the padding) to a multiple of the global batch, each process takes every
process_count-th batch: every example seen once, the same batch count on every process.
The dataset itself comes from registry.py (`get_dataset`: source, transforms, metadata).
`uint8=True` (the trainer's input) leaves normalisation and random erasing to the jitted step
(`device_side`; docs/input_pipeline.md).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import math
import os
import shutil
import tempfile
from typing import Callable, Sequence

import grain
import ml_collections

from structvit_jax.data import registry
from structvit_jax.data.ops import BAD_MARKERS, AddMask, device_side
from structvit_jax.data.spec import Transform


@dataclasses.dataclass(frozen=True)
class Input:
  """What the trainer gets from `create_input`."""
  iterator: grain.DatasetIterator | None  # train: infinite, checkpointable; eval: None
  make_eval_iterator: Callable[[], grain.DatasetIterator]  # fresh finite pass, with 'mask'
  num_examples: int                       # global, in this split
  num_classes: int
  input_shape: tuple[int, ...]            # per example: (H, W, 3) or (T, H, W, 3)
  num_eval_batches: int                   # batches each process yields per eval pass
  # uint8=True: the (mean, std) the consumer must normalise the uint8 images with (on the
  # device: device_input.normalize); None: the pipeline normalised them (float32).
  normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def _apply(ds: grain.MapDataset, transforms: Sequence[Transform]) -> grain.MapDataset:
  for t in transforms:
    ds = ds.random_map(t) if isinstance(t, grain.transforms.RandomMap) else ds.map(t)
  return ds


def _exit_with_parent(trainer_pid: int, worker_index: int, worker_count: int) -> None:
  """grain worker init: the worker exits when the trainer that started it is gone (a
  `kill -9` of the trainer would otherwise leave the workers, and through them the
  multiprocessing resource tracker, running). A daemon thread watches the parent pid;
  prctl(PR_SET_PDEATHSIG) is not used because it fires when the parent *thread* that
  spawned the worker exits, which need not be the trainer's end."""
  del worker_index, worker_count
  import threading
  import time

  def watch():
    while os.getppid() == trainer_pid:  # reparented (to init) once the trainer is gone
      time.sleep(0.5)
    os._exit(0)  # no one will read this worker's batches

  threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()


def _to_iter(ds: grain.MapDataset, num_workers: int) -> grain.IterDataset:
  # Elements here are whole local batches: keep the read-ahead buffer to a few of them.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  if num_workers > 0:
    if not os.environ.get(BAD_MARKERS):  # the workers inherit the environment
      os.environ[BAD_MARKERS] = tempfile.mkdtemp(prefix="structvit_jax_bad_")
      atexit.register(shutil.rmtree, os.environ[BAD_MARKERS], True)
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=2),
                        worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
  return it


def create_input(config: ml_collections.ConfigDict, split: str, local_batch_size: int,
                 process_index: int = 0, process_count: int = 1, seed: int = 0,
                 uint8: bool = False) -> Input:
  """Builds the input of `split` ('train' | 'eval') for one process (module docstring).

  uint8: images/clips stay uint8 (a quarter of float32's bytes from the workers to the
  devices); normalisation, and random erasing (its box drawn here, in `erase`), are left
  to the jitted step with `Input.normalization` (device_input.py). Otherwise float32,
  normalised here."""
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if local_batch_size <= 0:
    raise ValueError(f"local_batch_size must be positive, got {local_batch_size}")
  train = split == "train"
  split_name = config.data.train_split if train else config.data.eval_split
  spec = registry.get_dataset(config, split_name, train)
  num_examples = len(spec.source)
  global_batch = local_batch_size * process_count
  workers = int(config.data.num_workers)

  # Eval always uses the deterministic transforms (no augmentation), even on the train split.
  eval_spec = spec if not train else registry.get_dataset(config, split_name, train=False)
  normalization = None
  if uint8:
    ops, normalization = device_side(spec.transforms)
    eval_ops, eval_normalization = device_side(eval_spec.transforms)
    if train and eval_normalization != normalization:
      raise ValueError(f"{split_name!r}: train and eval normalise differently "
                       f"({normalization} vs {eval_normalization})")
    spec = dataclasses.replace(spec, transforms=ops)
    eval_spec = dataclasses.replace(eval_spec, transforms=eval_ops)

  iterator = None
  if train:
    if num_examples < global_batch:
      raise ValueError(f"{split_name!r} has {num_examples} examples, fewer than one global "
                       f"batch ({global_batch})")
    if hasattr(spec.source, "will_read"):  # built-in sources: draw up front only for >1 pass
      steps = int(config.get("num_train_steps", -1))
      spec.source.will_read(steps * global_batch if steps > 0
                            else float(config.get("num_epochs", math.inf)) * num_examples)
    ds = grain.MapDataset.source(spec.source).seed(seed).shuffle().repeat()
    ds = _apply(ds, spec.transforms)
    ds = ds.batch(local_batch_size, drop_remainder=True)[process_index::process_count]
    iterator = iter(_to_iter(ds, workers))

  num_eval_batches = math.ceil(num_examples / global_batch)
  padded = num_eval_batches * global_batch

  def make_eval_iterator() -> grain.DatasetIterator:
    ds = grain.MapDataset.source(eval_spec.source)
    if padded > num_examples:  # pad by wrapping around; the mask drops the copies
      ds = ds.repeat(math.ceil(padded / num_examples))[:padded]
    ds = _apply(ds.map_with_index(AddMask(num_examples)), eval_spec.transforms)
    ds = ds.batch(local_batch_size, drop_remainder=True)[process_index::process_count]
    return iter(_to_iter(ds, workers))

  return Input(iterator=iterator, make_eval_iterator=make_eval_iterator,
               num_examples=num_examples, num_classes=spec.num_classes,
               input_shape=spec.input_shape, num_eval_batches=num_eval_batches,
               normalization=normalization)
