"""Input pipeline assembly: a random-access source -> grain MapDataset -> per-process batches.

Train: source -> seeded shuffle, reshuffled every epoch (`.seed(s).shuffle().repeat()`) ->
transforms (per-example RNG keyed by the position in the global stream) -> batches of the
local batch size -> this process's batches `[process_index::process_count]`. So global step
t always consists of global stream positions [t*B, (t+1)*B) in process order: the global
batch, augmentations included, is identical whatever the number of processes, and shards
are disjoint. The iterator is a grain DatasetIterator (get_state/set_state), saved in the
Orbax checkpoint by the trainer.

Eval: the split is padded (wrapping around) to a multiple of the global batch, a `mask`
marks the padding, and each process takes every process_count-th batch: every example is
seen exactly once over all processes and every process runs the same number of batches.

A dataset is registered in `_BUILDERS` as a function (config.data, split name, train) ->
`DatasetSpec` (source + transforms + metadata); real datasets plug in the same way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import grain
import ml_collections
import numpy as np

from structvit_jax.data import synthetic

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VIDEO_MEAN, VIDEO_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)  # SlowFast/UniFormer video

Transform = grain.transforms.Map | grain.transforms.RandomMap


class Normalize(grain.transforms.Map):
  """uint8 image/clip -> float32 (x/255 - mean) / std."""

  def __init__(self, mean: Sequence[float], std: Sequence[float]):
    self.mean = np.asarray(mean, np.float32) * 255.0
    self.scale = 1.0 / (np.asarray(std, np.float32) * 255.0)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = (element["image"].astype(np.float32) - self.mean) * self.scale
    return {**element, "image": image}


class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip with probability 1/2 (W is axis -2 for images and clips)."""

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() < 0.5:
      element = {**element, "image": np.ascontiguousarray(element["image"][..., ::-1, :])}
    return element


class AddMask(grain.transforms.MapWithIndex):
  """mask = True for the first `num_real` positions, False for the padding after them."""

  def __init__(self, num_real: int):
    self.num_real = num_real

  def map_with_index(self, index: int, element: dict[str, Any]) -> dict[str, Any]:
    return {**element, "mask": np.bool_(index < self.num_real)}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  source: Any                       # random access: __len__, __getitem__ -> dict(image, label)
  num_classes: int
  input_shape: tuple[int, ...]      # per example, after the transforms
  transforms: tuple[Transform, ...]  # grain Map / RandomMap, applied in order


class DatasetNotFoundError(FileNotFoundError):
  """A configured dataset is missing; the message says where it was expected and how to
  prepare it."""


def _synthetic_image(data: ml_collections.ConfigDict, split: str, train: bool) -> DatasetSpec:
  size = data.image_size
  source = synthetic.SyntheticImageSource(split, _num_examples(data, split), size,
                                          seed=data.get("generator_seed", 0))
  ops = (RandomFlip(),) if train and data.get("random_flip", True) else ()
  return DatasetSpec(source, source.num_classes, (size, size, 3),
                     ops + (Normalize(IMAGENET_MEAN, IMAGENET_STD),))


def _synthetic_video(data: ml_collections.ConfigDict, split: str, train: bool) -> DatasetSpec:
  del train  # no flip: it would swap 'left' and 'right' (as for Something-Something)
  size, frames = data.image_size, data.num_frames
  if frames <= 0:
    raise ValueError("synthetic_video needs config.data.num_frames > 0")
  source = synthetic.SyntheticVideoSource(split, _num_examples(data, split), size, frames,
                                          seed=data.get("generator_seed", 0))
  return DatasetSpec(source, source.num_classes, (frames, size, size, 3),
                     (Normalize(VIDEO_MEAN, VIDEO_STD),))


def _num_examples(data: ml_collections.ConfigDict, split: str) -> int:
  # Sizes of the built-in datasets: config.data.{train,eval}_examples when set.
  key = "train_examples" if split == data.train_split else "eval_examples"
  return int(data.get(key, 4096 if key == "train_examples" else 1024))


def _video(data: ml_collections.ConfigDict, split: str, train: bool) -> DatasetSpec:
  from structvit_jax.data import video  # imports PyAV only when a video dataset is used
  return video.build_dataset(data, split, train)


def _motion(data: ml_collections.ConfigDict, split: str, train: bool) -> DatasetSpec:
  from structvit_jax.data import motion  # random-dot kinematograms (motion.py)
  return motion.build_dataset(data, split, train)


def _images(data: ml_collections.ConfigDict, split: str, train: bool) -> DatasetSpec:
  from structvit_jax.data import images  # imports tfds only when an image dataset is used
  return images.build_dataset(data, split, train)


_BUILDERS: dict[str, Callable[[ml_collections.ConfigDict, str, bool], DatasetSpec]] = {
    "synthetic_image": _synthetic_image,
    "synthetic_video": _synthetic_video,
    "synthetic_motion": _motion,
    # List file + video folder, decoded with PyAV (video.py).
    "kinetics400": _video,
    "ssv2": _video,
    "diving48": _video,
    "finegym": _video,
    # tfds ArrayRecord images (ours from prepare.py, or official tfds imagenet2012): images.py.
    "imagenet2012": _images,
    "image_folder": _images,
}

def get_dataset(config: ml_collections.ConfigDict, split: str, train: bool) -> DatasetSpec:
  """The dataset `config.data.name`, split `split` (a split name such as 'train')."""
  name = config.data.name
  if name in _BUILDERS:
    return _BUILDERS[name](config.data, split, train)
  raise ValueError(f"unknown dataset config.data.name={name!r}; valid names: "
                   f"{', '.join(sorted(_BUILDERS))}")


@dataclasses.dataclass(frozen=True)
class Input:
  """What the trainer gets from `create_input`."""
  iterator: grain.DatasetIterator | None  # train: infinite, checkpointable; eval: None
  make_eval_iterator: Callable[[], grain.DatasetIterator]  # fresh finite pass, with 'mask'
  num_examples: int                       # global, in this split
  num_classes: int
  input_shape: tuple[int, ...]            # per example: (H, W, 3) or (T, H, W, 3)
  num_eval_batches: int                   # batches each process yields per eval pass


def _apply(ds: grain.MapDataset, transforms: Sequence[Transform]) -> grain.MapDataset:
  for t in transforms:
    ds = ds.random_map(t) if isinstance(t, grain.transforms.RandomMap) else ds.map(t)
  return ds


def _to_iter(ds: grain.MapDataset, num_workers: int) -> grain.IterDataset:
  # Elements here are whole local batches: keep the read-ahead buffer to a few of them.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=2))
  return it


def create_input(config: ml_collections.ConfigDict, split: str, local_batch_size: int,
                 process_index: int = 0, process_count: int = 1, seed: int = 0) -> Input:
  """Builds the input of `split` ('train' | 'eval') for one process (module docstring)."""
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if local_batch_size <= 0:
    raise ValueError(f"local_batch_size must be positive, got {local_batch_size}")
  train = split == "train"
  split_name = config.data.train_split if train else config.data.eval_split
  spec = get_dataset(config, split_name, train)
  num_examples = len(spec.source)
  global_batch = local_batch_size * process_count
  workers = int(config.data.num_workers)

  iterator = None
  if train:
    if num_examples < global_batch:
      raise ValueError(f"{split_name!r} has {num_examples} examples, fewer than one global "
                       f"batch ({global_batch})")
    ds = grain.MapDataset.source(spec.source).seed(seed).shuffle().repeat()
    ds = _apply(ds, spec.transforms)
    ds = ds.batch(local_batch_size, drop_remainder=True)[process_index::process_count]
    iterator = iter(_to_iter(ds, workers))

  # Eval always uses the deterministic transforms (no augmentation), even on the train split.
  eval_spec = spec if not train else get_dataset(config, split_name, train=False)
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
               input_shape=spec.input_shape, num_eval_batches=num_eval_batches)
