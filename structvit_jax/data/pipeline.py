"""Input pipeline assembly: a random-access source -> grain MapDataset -> per-process batches.

Train: seeded shuffle, reshuffled every epoch -> transforms (per-example RNG keyed by the
position in the global stream) -> local batches -> this process's `[process_index::
process_count]`. Global step t is stream positions [t*B, (t+1)*B): the global batch,
augmentations included, is the same for any number of processes. The grain iterator's
state is saved in the trainer's checkpoints. Eval: the split is padded (wrapping around,
`mask` marks the padding) to a multiple of the global batch, each process takes every
process_count-th batch: every example seen once, the same batch count on every process.
`_BUILDERS`: (config.data, split name, train) -> `DatasetSpec` (source, transforms, metadata).
`uint8=True` (the trainer's input) leaves normalisation and random erasing to the jitted step
(`device_side`; docs/input_pipeline.md).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Sequence

from absl import logging
import grain
import ml_collections
import numpy as np

from structvit_jax.data import synthetic

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VIDEO_MEAN, VIDEO_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)  # SlowFast/UniFormer video

Transform = grain.transforms.Map | grain.transforms.RandomMap
_WARNED: set[str] = set()  # unreadable examples this process has logged
_MARKERS = "STRUCTVIT_JAX_BAD_MARKERS"  # env: a folder the trainer shares with its workers


def warn_bad_once(key: str, message: str, *args: Any) -> None:
  """Logs an unreadable example (`key`: which) once per trainer. Grain workers are new
  processes on every eval pass, so with workers the first to log leaves a marker file."""
  if key in _WARNED:
    return
  _WARNED.add(key)
  try:
    if _MARKERS in os.environ:  # only the process that creates the marker logs
      os.close(os.open(os.path.join(os.environ[_MARKERS], hashlib.sha1(key.encode())
                                    .hexdigest()), os.O_CREAT | os.O_EXCL))
    logging.warning(message, *args)
  except FileExistsError:
    pass


class Normalize(grain.transforms.Map):
  """uint8 image/clip -> float32 (x/255 - mean) / std. The trainer's input leaves it to the
  jitted step (`create_input(uint8=True)`, device_input.normalize), with these constants."""

  def __init__(self, mean: Sequence[float], std: Sequence[float]):
    self.stats = (tuple(float(m) for m in mean), tuple(float(s) for s in std))
    self.mean = np.asarray(mean, np.float32) * 255.0
    self.scale = 1.0 / (np.asarray(std, np.float32) * 255.0)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = (element["image"].astype(np.float32) - self.mean) * self.scale
    return {**element, "image": image}


class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip with probability 1/2: PIL images, and arrays whose W is axis -2 (HWC
  images, THWC clips). A token label map [..., h, w] flips with its image, and a crop box
  already drawn on it (x0, y0, x1, y1) is mirrored: the flipped crop of the map is then
  the crop of the flipped map."""

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() < 0.5:
      im = element["image"]
      im = (np.ascontiguousarray(im[..., ::-1, :]) if isinstance(im, np.ndarray)
            else im.transpose(0))  # PIL Image.Transpose.FLIP_LEFT_RIGHT
      element = {**element, "image": im}
      if "token_label" in element:
        element["token_label"] = np.ascontiguousarray(element["token_label"][..., ::-1])
      if "token_label_box" in element:
        x0, y0, x1, y1 = element["token_label_box"]
        element["token_label_box"] = np.asarray([1 - x1, y0, 1 - x0, y1], np.float32)
    return element


class RandomErasing(grain.transforms.RandomMap):
  """timm RandomErasing, mode 'pixel', one box, on the normalised image or clip: with
  probability p a box of 2%-1/3 of the area and aspect in [0.3, 1/0.3] is filled with
  N(0, 1) noise; a clip gets the same box on every frame (SlowFast's `cube` erasing) and
  fresh noise per frame. `EraseBox` is its uint8-input form (the box only)."""

  def __init__(self, probability: float = 0.25, min_area: float = 0.02,
               max_area: float = 1 / 3, min_aspect: float = 0.3):
    self.p, self.min_area, self.max_area = probability, min_area, max_area
    self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

  def box(self, shape: Sequence[int], rng: np.random.Generator
          ) -> tuple[int, int, int, int] | None:
    """(top, left, h, w) of the box to erase in an image/clip of `shape`, or None."""
    if rng.random() > self.p:
      return None
    *_, h_img, w_img, _ = shape
    for _ in range(10):
      target = rng.uniform(self.min_area, self.max_area) * h_img * w_img
      aspect = math.exp(rng.uniform(*self.log_aspect))
      h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
      if w < w_img and h < h_img:
        return int(rng.integers(0, h_img - h + 1)), int(rng.integers(0, w_img - w + 1)), h, w
    return None

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    img = element["image"]
    box = self.box(img.shape, rng)
    if box is None:
      return element
    top, left, h, w = box
    *lead, _, _, c = img.shape
    img = img.copy()
    img[..., top:top + h, left:left + w, :] = rng.standard_normal((*lead, h, w, c), np.float32)
    return {**element, "image": img}


class EraseBox(RandomErasing):
  """RandomErasing for uint8 images/clips, whose erased pixels cannot be uint8: draws the same
  box from the same rng draws and emits it as `erase` = int32 [top, left, h, w] (h = w = 0:
  nothing erased); the jitted step fills it with N(0, 1) noise after normalising
  (device_input.erase; docs/input_pipeline.md)."""

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    box = self.box(element["image"].shape, rng)
    return {**element, "erase": np.asarray(box or (0, 0, 0, 0), np.int32)}


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
                                          seed=data.generator_seed)
  ops = (RandomFlip(),) if train and data.random_flip else ()
  return DatasetSpec(source, source.num_classes, (size, size, 3),
                     ops + (Normalize(IMAGENET_MEAN, IMAGENET_STD),))


def _synthetic_video(data: ml_collections.ConfigDict, split: str, train: bool) -> DatasetSpec:
  del train  # no flip: it would swap 'left' and 'right' (as for Something-Something)
  size, frames = data.image_size, data.num_frames
  if frames <= 0:
    raise ValueError("synthetic_video needs config.data.num_frames > 0")
  source = synthetic.SyntheticVideoSource(split, _num_examples(data, split), size, frames,
                                          seed=data.generator_seed)
  return DatasetSpec(source, source.num_classes, (frames, size, size, 3),
                     (Normalize(VIDEO_MEAN, VIDEO_STD),))


def _num_examples(data: ml_collections.ConfigDict, split: str) -> int:
  # Sizes of the built-in datasets.
  return int(data.train_examples if split == data.train_split else data.eval_examples)


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
    # List file + video folder, decoded with PyAV (video.py); SSv1: frame folders (PIL).
    "kinetics400": _video,
    "ssv1": _video,
    "ssv2": _video,
    "diving48": _video,
    "finegym": _video,
    # tfds ArrayRecord images (ours from prepare.py, or official tfds imagenet2012): images.py.
    "imagenet2012": _images,
    "image_folder": _images,
}

_TOKEN_LABELS = ("imagenet2012", "image_folder")  # builders that join token labels (images.py)


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
  import os
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
    if not os.environ.get(_MARKERS):  # the workers inherit the environment
      os.environ[_MARKERS] = tempfile.mkdtemp(prefix="structvit_jax_bad_")
      atexit.register(shutil.rmtree, os.environ[_MARKERS], True)
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=2),
                        worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
  return it


def device_side(transforms: Sequence[Transform]
                ) -> tuple[tuple[Transform, ...], tuple[tuple[float, ...], ...] | None]:
  """(transforms for uint8 output, the (mean, std) left to the device): `Normalize` is
  dropped and `RandomErasing` becomes `EraseBox`; the ops between them see uint8."""
  ops, stats = [], None
  for t in transforms:
    if isinstance(t, Normalize):
      if stats is not None and t.stats != stats:
        raise ValueError(f"two normalisations in one pipeline: {stats} and {t.stats}")
      stats = t.stats
    elif isinstance(t, RandomErasing) and not isinstance(t, EraseBox):
      box = EraseBox(t.p, t.min_area, t.max_area)
      box.log_aspect = t.log_aspect
      ops.append(box)
    else:
      ops.append(t)
  return tuple(ops), stats


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
  if train and config.data.get("token_label_dir") and config.data.name not in _TOKEN_LABELS:
    raise ValueError(f"config.data.token_label_dir is set but {config.data.name!r} has no "
                     f"token labels (image datasets only: {', '.join(_TOKEN_LABELS)})")
  spec = get_dataset(config, split_name, train)
  num_examples = len(spec.source)
  global_batch = local_batch_size * process_count
  workers = int(config.data.num_workers)

  # Eval always uses the deterministic transforms (no augmentation), even on the train split.
  eval_spec = spec if not train else get_dataset(config, split_name, train=False)
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
