"""Image transforms for tfds image data: decoding (with bad-sample replacement) and the
DeiT train / eval preprocessing, as grain transforms over PIL images and numpy arrays.

They follow timm (which DeiT uses) op for op: RandomResizedCrop (bicubic), horizontal
flip, RandAugment (`rand_augment_transform`: its op lists, level functions, per-op
probability 0.5, gaussian magnitude noise, fill = ImageNet mean), ImageNet
normalisation, then RandomErasing ('pixel' mode: per-pixel N(0, 1) on the normalised
image; for the trainer's uint8 input both run in the jitted step: docs/input_pipeline.md).
All randomness comes from the np.random.Generator grain hands each RandomMap (seeded per
example), so a pipeline is deterministic given its seed.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any, Callable, Sequence

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from structvit_jax.data import token_labels
from structvit_jax.data.ops import RandomErasing, RandomFlip, warn_bad_once
from structvit_jax.data.spec import DEFAULT_EVAL_CROP_RATIO, IMAGENET_MEAN

BICUBIC = Image.Resampling.BICUBIC
Element = dict[str, Any]


# ----------------------------------------------------------------------------- decoding


def decode_jpeg(data: bytes) -> Image.Image:
  """RGB PIL image; raises on any corrupt or truncated data (PIL checks the whole file)."""
  im = Image.open(io.BytesIO(data))
  im.load()
  return im if im.mode == "RGB" else im.convert("RGB")


class DecodedImages:
  """Random-access source over a tfds source of encoded images that decodes them, and
  replaces an unreadable example by the next readable one (deterministic: index i+1,
  i+2, ...). Output: dict(image=PIL RGB, label=int32, bad=int32 1 if replaced), plus the
  record's other keys but file_name (a token label map goes with its own image).

  Each bad record is logged once (ops.warn_bad_once) with its path, however many
  pipelines (train, eval passes, workers) read it; eval masks the stand-in out (MaskBad).
  """

  def __init__(self, source: Any, where: str, max_tries: int = 100):
    self.source, self.where, self.max_tries = source, where, max_tries

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> Element:
    n = len(self.source)
    for k in range(min(self.max_tries, n)):
      i = (index + k) % n
      record = self.source[i]
      try:
        image = decode_jpeg(record["image"])
      except Exception as e:  # corrupt / truncated: any decode failure
        name = record.get("file_name", b"?")
        name = name.decode() if isinstance(name, bytes) else str(name)
        warn_bad_once(f"{self.where}:{i}", "unreadable image %s (record %d of %s): %s: %s; "
                      "training replaces it by the next readable example, evaluation leaves "
                      "it out", name, i, self.where, type(e).__name__, e)
        continue
      extra = {k: v for k, v in record.items() if k not in ("image", "label", "file_name")}
      return {**extra, "image": image, "label": np.int32(record["label"]),
              "bad": np.int32(k > 0)}
    raise RuntimeError(f"{self.max_tries} consecutive unreadable images from record {index} "
                       f"of {self.where}: the data is probably broken; prepare it again")


class MaskBad(grain.transforms.Map):
  """Eval: an example that stands in for an unreadable one gets mask False, so exact
  evaluation counts every readable example once and the bad ones not at all."""

  def map(self, element: Element) -> Element:
    if "mask" in element and "bad" in element:
      element = {**element, "mask": np.bool_(element["mask"] and not element["bad"])}
    return element


# ----------------------------------------------------------------------------- geometry


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: Sequence[float], ratio: Sequence[float]
                            ) -> tuple[int, int, int, int]:
  """(left, top, w, h), torchvision/timm RandomResizedCrop.get_params."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  # Fallback: central crop at the nearest allowed aspect ratio.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


class RandomResizedCrop(grain.transforms.RandomMap):
  def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0),
               ratio: Sequence[float] = (3 / 4, 4 / 3)):
    self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

  def random_map(self, element: Element, rng: np.random.Generator) -> Element:
    im = element["image"]
    x, y, w, h = random_resized_crop_box(rng, im.width, im.height, self.scale, self.ratio)
    out = {**element, "image": im.resize((self.size, self.size), BICUBIC,
                                         box=(x, y, x + w, y + h))}
    if "token_label" in element:  # the crop as fractions of the image (= of its label map)
      out["token_label_box"] = np.asarray(
          [x / im.width, y / im.height, (x + w) / im.width, (y + h) / im.height], np.float32)
    return out


class ResizeCenterCrop(grain.transforms.Map):
  """Eval: shorter side to floor(size / crop_ratio) (bicubic), then the central size x size
  (timm's eval transform with crop_pct)."""

  def __init__(self, size: int, crop_ratio: float = DEFAULT_EVAL_CROP_RATIO):
    self.size, self.resize_to = size, int(math.floor(size / crop_ratio))

  def map(self, element: Element) -> Element:
    im = element["image"]
    w, h = im.size
    s = self.resize_to
    new = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    im = im.resize(new, BICUBIC)
    left = int(round((new[0] - self.size) / 2.0))
    top = int(round((new[1] - self.size) / 2.0))
    return {**element, "image": im.crop((left, top, left + self.size, top + self.size))}


class ToArray(grain.transforms.Map):
  """PIL -> uint8 HWC array."""

  def map(self, element: Element) -> Element:
    return {**element, "image": np.asarray(element["image"], dtype=np.uint8)}


# ----------------------------------------------------------------------------- RandAugment
# timm.data.auto_augment, rand_augment_transform, reproduced op for op.

_LEVEL_DENOM = 10.0
_RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                    "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                    "ShearY", "TranslateXRel", "TranslateYRel")
_RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel")


def _negate(rng: np.random.Generator, v: float) -> float:
  return -v if rng.random() > 0.5 else v


def _level(name: str, m: float, rng: np.random.Generator) -> Any:
  """timm's *_level_to_arg for op `name` at magnitude m (in [0, 10])."""
  f = m / _LEVEL_DENOM
  if name == "Rotate":
    return _negate(rng, f * 30.0)
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return f * 1.8 + 0.1
  if name.endswith("Increasing") and name[:-10] in ("Color", "Contrast", "Brightness",
                                                    "Sharpness"):
    return max(0.1, 1.0 + _negate(rng, f * 0.9))
  if name in ("ShearX", "ShearY"):
    return _negate(rng, f * 0.3)
  if name in ("TranslateXRel", "TranslateYRel"):
    return _negate(rng, f * 0.45)  # translate_pct default
  if name == "Posterize":
    return int(f * 4)
  if name == "PosterizeIncreasing":
    return 4 - int(f * 4)
  if name == "Solarize":
    return int(f * 256)
  if name == "SolarizeIncreasing":
    return 256 - int(f * 256)
  if name == "SolarizeAdd":
    return int(f * 110)
  return None  # AutoContrast, Equalize, Invert: no argument


def _apply_op(name: str, im: Image.Image, v: Any, fill: tuple[int, ...]) -> Image.Image:
  affine = dict(resample=BICUBIC, fillcolor=fill)
  base = name[:-10] if name.endswith("Increasing") else name
  if base == "AutoContrast":
    return ImageOps.autocontrast(im)
  if base == "Equalize":
    return ImageOps.equalize(im)
  if base == "Invert":
    return ImageOps.invert(im)
  if base == "Rotate":
    return im.rotate(v, **affine)
  if base == "Posterize":
    if v >= 8:
      return im
    # Keeping 0 bits (magnitude 10 of PosterizeIncreasing) gives black in the PIL timm was
    # written for; Pillow >= 10 rejects bits=0.
    return ImageOps.posterize(im, v) if v >= 1 else Image.new(im.mode, im.size)
  if base == "Solarize":
    return ImageOps.solarize(im, v)
  if base == "SolarizeAdd":
    lut = [min(255, i + v) if i < 128 else i for i in range(256)]
    return im.point(lut * len(im.getbands()))
  if base in ("Color", "Contrast", "Brightness", "Sharpness"):
    return getattr(ImageEnhance, base)(im).enhance(v)
  if base == "ShearX":
    return im.transform(im.size, Image.Transform.AFFINE, (1, v, 0, 0, 1, 0), **affine)
  if base == "ShearY":
    return im.transform(im.size, Image.Transform.AFFINE, (1, 0, 0, v, 1, 0), **affine)
  if base == "TranslateXRel":
    return im.transform(im.size, Image.Transform.AFFINE, (1, 0, v * im.size[0], 0, 1, 0),
                        **affine)
  if base == "TranslateYRel":
    return im.transform(im.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, v * im.size[1]),
                        **affine)
  raise ValueError(f"unknown RandAugment op {name!r}")


def _affine_matrix(name: str, v: Any, size: tuple[int, int]) -> tuple[float, ...] | None:
  """The PIL affine (a, b, c, d, e, f) that `_apply_op` applies for a geometric op (output
  pixel (x, y) samples input (a x + b y + c, d x + e y + f)); None for the others.
  Rotate's is the matrix PIL's Image.rotate builds (about the centre)."""
  if name == "Rotate":
    angle = -math.radians(v)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    cx, cy = size[0] / 2.0, size[1] / 2.0
    return (a, b, a * -cx + b * -cy + cx, -b, a, -b * -cx + a * -cy + cy)
  if name == "ShearX":
    return (1.0, v, 0.0, 0.0, 1.0, 0.0)
  if name == "ShearY":
    return (1.0, 0.0, 0.0, v, 1.0, 0.0)
  if name == "TranslateXRel":
    return (1.0, 0.0, v * size[0], 0.0, 1.0, 0.0)
  if name == "TranslateYRel":
    return (1.0, 0.0, 0.0, 0.0, 1.0, v * size[1])
  return None


class RandAugment(grain.transforms.RandomMap):
  """timm RandAugment from a config string 'rand-m9-mstd0.5[-inc1][-n2][-mmax10][-p0.5]':
  n ops drawn uniformly with replacement, each applied with probability p at magnitude
  N(m, mstd) clipped to [0, mmax]. With token labels, the geometric ops (rotate, shear,
  translate) move the `token_label` map with the image (`token_labels.warp_map`), as the
  official token-labeling trainer's RandAugment does (docs/token_labeling.md)."""

  def __init__(self, config: str, mean: Sequence[float] = IMAGENET_MEAN):
    parts = config.split("-")
    if parts[0] != "rand":
      raise ValueError(f"RandAugment config must start with 'rand-', got {config!r}")
    self.m, self.n, self.std, self.max, self.p = 10.0, 2, 0.0, _LEVEL_DENOM, 0.5
    self.ops = _RAND_TRANSFORMS
    for part in parts[1:]:
      key, val = re.match(r"([a-z]+)(.*)", part).groups()
      if key == "m":
        self.m = float(val)
      elif key == "n":
        self.n = int(val)
      elif key == "mstd":
        self.std = float(val) if float(val) <= 100 else math.inf
      elif key == "mmax":
        self.max = float(val)
      elif key == "p":
        self.p = float(val)
      elif key == "inc":
        self.ops = _RAND_INCREASING_TRANSFORMS if int(val) else _RAND_TRANSFORMS
      else:
        raise ValueError(f"unsupported RandAugment option {part!r} in {config!r}")
    self.fill = tuple(min(255, round(255 * x)) for x in mean)

  def random_map(self, element: Element, rng: np.random.Generator) -> Element:
    im, out = element["image"], dict(element)
    for name in rng.choice(self.ops, self.n, replace=True):
      if self.p < 1.0 and rng.random() > self.p:
        continue
      m = self.m
      if self.std > 0:
        m = rng.uniform(0, m) if math.isinf(self.std) else rng.normal(m, self.std)
      m = max(0.0, min(m, self.max))
      v = _level(str(name), m, rng)
      if "token_label" in out:  # token labeling: the geometric ops move the map too
        matrix = _affine_matrix(str(name), v, im.size)
        if matrix is not None:
          out["token_label"] = token_labels.warp_map(
              out["token_label"], out.get("token_label_box", (0.0, 0.0, 1.0, 1.0)), matrix,
              im.size)
      im = _apply_op(str(name), im, v, self.fill)
    return {**out, "image": im}


# ----------------------------------------------------------------------------- recipes


def deit_train(size: int, normalize: Callable[[], grain.transforms.Map], *,
               scale: Sequence[float] = (0.08, 1.0), flip: bool = True,
               randaugment: str = "rand-m9-mstd0.5-inc1", random_erase: float = 0.25,
               mean: Sequence[float] = IMAGENET_MEAN) -> tuple:
  ops: list = [RandomResizedCrop(size, scale)]
  if flip:
    ops.append(RandomFlip())
  if randaugment:
    ops.append(RandAugment(randaugment, mean))
  ops += [ToArray(), normalize()]
  if random_erase > 0:
    ops.append(RandomErasing(random_erase))
  return tuple(ops)
