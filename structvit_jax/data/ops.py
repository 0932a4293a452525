"""The ops every source shares, as grain transforms: normalisation, flip, random erasing
(and its uint8 form, `device_side`), the eval padding mask, and the once-per-trainer log of
an unreadable example (`warn_bad_once`)."""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any, Sequence

from absl import logging
import grain
import numpy as np

from structvit_jax.data.spec import Transform

_WARNED: set[str] = set()  # unreadable examples this process has logged
BAD_MARKERS = "STRUCTVIT_JAX_BAD_MARKERS"  # env: a folder the trainer shares with its workers


def warn_bad_once(key: str, message: str, *args: Any) -> None:
  """Logs an unreadable example (`key`: which) once per trainer. Grain workers are new
  processes on every eval pass, so with workers the first to log leaves a marker file."""
  if key in _WARNED:
    return
  _WARNED.add(key)
  try:
    if BAD_MARKERS in os.environ:  # only the process that creates the marker logs
      os.close(os.open(os.path.join(os.environ[BAD_MARKERS], hashlib.sha1(key.encode())
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
