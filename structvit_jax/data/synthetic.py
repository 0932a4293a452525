"""Built-in procedural datasets (synthetic_image, synthetic_video): seeded, deterministic
per index, nothing to download; their renderers, sources and builder.

Both are random-access sources (`__len__`, `__getitem__` -> {'image': uint8, 'label':
int32}), so grain reads them exactly like a prepared tfds ArrayRecord source; the pipeline
normalises them like real data. Every example is generated from
`np.random.SeedSequence((seed, split_id, index))`, so the splits are disjoint, and any
example can be regenerated on its own (resumable, shardable, multi-worker).

- synthetic_image (10 classes): the class is the shape (circle, square, triangle, cross,
  ring) x the orientation of the stripes filling it (horizontal, vertical), drawn at a
  random position, scale and rotation, in a random colour that stands out from a random
  background (gradient + a faint grating at a random orientation), sometimes with a small
  plain distractor shape, plus pixel noise.
- synthetic_video (8 classes, in the spirit of Something-Something): the class is the
  motion of one striped shape (moving left, right, up or down, rotating clockwise or
  counter-clockwise, expanding or shrinking) over a random static background, sometimes
  with a static distractor shape. Appearance, start state and motion magnitudes are drawn
  before the class is used, so for a given appearance seed frame 0 is the same for every
  class: only the motion tells. Clockwise vs counter-clockwise is the hard pair.
"""

from __future__ import annotations

import threading
import ml_collections
import numpy as np

from structvit_jax.data.ops import Normalize, RandomFlip
from structvit_jax.data.spec import (IMAGENET_MEAN, IMAGENET_STD, VIDEO_MEAN, VIDEO_STD,
                                     DatasetSpec)

SHAPES = ("circle", "square", "triangle", "cross", "ring")
STRIPES = ("horizontal", "vertical")
IMAGE_CLASSES = tuple(f"{s}/{o}" for s in SHAPES for o in STRIPES)
VIDEO_SHAPES = SHAPES + ("bar",)
MOTIONS = ("left", "right", "up", "down", "clockwise", "counterclockwise", "expand", "shrink")
SPLITS = {"train": 1, "validation": 2, "test": 3}


def _box(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
  qx, qy = np.abs(u) - a, np.abs(v) - b
  return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _sdf(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Signed distance (negative inside) in units of the shape's radius."""
  if kind == "circle":
    return np.hypot(u, v) - 1.0
  if kind == "square":
    return _box(u, v, 0.8, 0.8)
  if kind == "triangle":  # equilateral, circumradius 1 (inradius 0.5): max over edge normals
    return np.max([np.cos(t) * u + np.sin(t) * v
                   for t in np.deg2rad([90.0, 210.0, 330.0])], axis=0) - 0.5
  if kind == "cross":
    return np.minimum(_box(u, v, 1.0, 0.3), _box(u, v, 0.3, 1.0))
  if kind == "ring":
    return np.abs(np.hypot(u, v) - 0.68) - 0.32
  if kind == "bar":
    return _box(u, v, 1.0, 0.4)
  raise ValueError(f"unknown shape {kind!r}")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
  return x, y


def _background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  size = x.shape[0]
  c0, c1 = rng.uniform(0.0, 1.0, (2, 3))
  a = rng.uniform(0, 2 * np.pi)
  g = ((np.cos(a) * x + np.sin(a) * y) / size * 0.5 + 0.5)[..., None]
  img = c0 + (c1 - c0) * g
  # A faint grating at a random orientation, so "striped" alone is no give-away.
  amp, period, b, phase = (rng.uniform(0.0, 0.08), rng.uniform(0.1, 0.2) * size,
                           rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi))
  img = img + amp * np.sin(2 * np.pi * (np.cos(b) * x + np.sin(b) * y) / period + phase)[..., None]
  return img


def _colours(rng: np.random.Generator, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A fill colour that stands out from the background's mean colour (so the silhouette
  reads as one blob) and a stripe colour 0.35 lighter/darker per channel."""
  bright = background.mean(axis=(0, 1)) < 0.5
  a = np.where(bright, rng.uniform(0.65, 1.0, 3), rng.uniform(0.0, 0.35, 3))
  b = a + np.where(bright, -0.35, 0.35)
  return a, b


def _draw(canvas: np.ndarray, x: np.ndarray, y: np.ndarray, kind: str, cx: float, cy: float,
          r: float, angle: float, fill_a: np.ndarray, fill_b: np.ndarray | None = None,
          period: float = 1.0, stripe_angle: float = 0.0, phase: float = 0.0,
          stripes_in_object: bool = False, coverage: list | None = None) -> np.ndarray:
  """Composites an anti-aliased shape; stripes (fill_a/fill_b sinusoid) if fill_b given.
  `coverage`, if given, gets the shape's per-pixel coverage [H, W] in [0, 1] appended."""
  dx, dy = x - cx, y - cy
  c, s = np.cos(angle), np.sin(angle)
  u, v = (c * dx + s * dy) / r, (-s * dx + c * dy) / r  # object rotated by +angle
  alpha = np.clip(0.5 - _sdf(kind, u, v) * r, 0.0, 1.0)[..., None]
  if coverage is not None:
    coverage.append(alpha[..., 0])
  if fill_b is None:
    fill = fill_a
  else:
    px, py = (u * r, v * r) if stripes_in_object else (dx, dy)
    w = np.cos(stripe_angle) * px + np.sin(stripe_angle) * py
    t = (0.5 + 0.5 * np.sin(2 * np.pi * w / period + phase))[..., None]
    fill = fill_a + (fill_b - fill_a) * t
  return canvas * (1.0 - alpha) + fill * alpha


def _to_uint8(img: np.ndarray) -> np.ndarray:
  return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _distractors(rng: np.random.Generator, canvas: np.ndarray, x, y, max_count: int) -> np.ndarray:
  size = x.shape[0]
  for _ in range(rng.integers(0, max_count + 1)):
    canvas = _draw(canvas, x, y, SHAPES[rng.integers(len(SHAPES))], *rng.uniform(0, size, 2),
                   rng.uniform(0.06, 0.12) * size, rng.uniform(0, 2 * np.pi),
                   rng.uniform(0, 1, 3))
  return canvas


def render_image(label: int, rng: np.random.Generator, size: int, return_mask: bool = False):
  """One synthetic_image example of class `label` (see IMAGE_CLASSES): uint8 [size, size, 3].
  With return_mask, also the class shape's coverage [size, size] in [0, 1] (distractors
  excluded; the shape is drawn last, so nothing covers it), e.g. for dense labels."""
  coverage: list = []
  shape, stripes = divmod(int(label), len(STRIPES))
  x, y = _grid(size)
  img = _distractors(rng, _background(rng, x, y), x, y, max_count=1)
  r = rng.uniform(0.28, 0.4) * size
  cx, cy = rng.uniform(0.8 * r, size - 0.8 * r, 2)
  fill_a, fill_b = _colours(rng, img)
  # Stripe normal along y for horizontal stripes, along x for vertical, +-10 degrees.
  stripe_angle = (np.pi / 2 if stripes == 0 else 0.0) + rng.uniform(-1, 1) * np.deg2rad(10)
  img = _draw(img, x, y, SHAPES[shape], cx, cy, r, rng.uniform(0, 2 * np.pi), fill_a, fill_b,
              period=rng.uniform(0.18, 0.25) * size, stripe_angle=stripe_angle,
              phase=rng.uniform(0, 2 * np.pi), coverage=coverage)
  img = _to_uint8(img + rng.normal(0.0, 0.03, img.shape))
  return (img, coverage[0]) if return_mask else img


def render_clip(motion: int, rng: np.random.Generator, num_frames: int, size: int,
                return_states: bool = False):
  """One synthetic_video clip with motion `motion` (see MOTIONS): uint8 [T, size, size, 3].

  All random draws are made before `motion` is used, so the same rng state gives the same
  appearance and start for every class. With return_states, also returns per-frame
  (cx, cy, radius, angle) of the moving shape (angle grows clockwise on screen: y is down).
  """
  x, y = _grid(size)
  bg = _distractors(rng, _background(rng, x, y), x, y, max_count=1)
  kind = VIDEO_SHAPES[rng.integers(len(VIDEO_SHAPES))]
  r0 = rng.uniform(0.16, 0.22) * size
  cx0, cy0 = rng.uniform(0.3, 0.7, 2) * size
  a0 = rng.uniform(0, 2 * np.pi)
  fill_a, fill_b = _colours(rng, bg)
  period, stripe_angle, phase = (rng.uniform(0.35, 0.6) * r0, rng.uniform(0, np.pi),
                                 rng.uniform(0, 2 * np.pi))
  dist, turn, growth = (rng.uniform(0.3, 0.45) * size, rng.uniform(np.pi / 2, 2 * np.pi / 3),
                        rng.uniform(1.6, 2.2))
  noise = rng.normal(0.0, 0.03, (num_frames, size, size, 3))
  name = MOTIONS[int(motion)]
  frames, states = [], []
  for t in range(num_frames):
    tau = t / max(num_frames - 1, 1)
    cx = cx0 + dist * tau * {"left": -1, "right": 1}.get(name, 0)
    cy = cy0 + dist * tau * {"up": -1, "down": 1}.get(name, 0)
    a = a0 + turn * tau * {"clockwise": 1, "counterclockwise": -1}.get(name, 0)
    r = r0 * growth ** (tau * {"expand": 1, "shrink": -1}.get(name, 0))
    # Stripes live in object coordinates (and scale with it) so rotation and scale show.
    frame = _draw(bg, x, y, kind, cx, cy, r, a, fill_a, fill_b, period=period * r / r0,
                  stripe_angle=stripe_angle, phase=phase, stripes_in_object=True)
    frames.append(frame + noise[t])
    states.append((cx, cy, r, a))
  clip = _to_uint8(np.stack(frames))
  return (clip, np.asarray(states)) if return_states else clip


CACHE_BYTES = 512 << 20   # a split up to this size is drawn once, then kept in memory
_DRAWING = threading.Lock()  # grain reads with threads: each split is drawn once


class Source:
  """Random-access source (grain's RandomAccessDataSource protocol). While a split fits
  CACHE_BYTES, the first read draws all of it and keeps it (read-only arrays): a training
  run draws each example once instead of once per epoch, and the first batch, which the
  trainer reads while it compiles, pays for it. A run that reads at most one pass
  (`will_read`: a short run, a smoke test) draws each example when it is read instead.
  Each example comes from its own rng either way: the same pixels."""

  num_classes: int

  def __init__(self, split: str, num_examples: int, image_size: int, seed: int = 0):
    if split not in SPLITS:
      raise ValueError(f"{type(self).__name__}: unknown split {split!r}; valid: {sorted(SPLITS)}")
    self.split, self.num_examples, self.image_size, self.seed = split, num_examples, image_size, seed
    self._cache: dict[str, np.ndarray] | None = None  # the whole split, once read
    self.draw_whole_split = True

  def will_read(self, count: float) -> None:
    """The pipeline says how many examples the run reads: drawing the whole split up front
    pays only when that is more than one pass."""
    self.draw_whole_split = count > self.num_examples

  def __len__(self) -> int:
    return self.num_examples

  def _rng(self, index: int) -> np.random.Generator:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self!r}")
    return np.random.default_rng((self.seed, SPLITS[self.split], index))

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    self._rng(index)  # range check
    size = self.image_size ** 2 * 3 * max(1, getattr(self, "num_frames", 1))
    if not self.draw_whole_split or self.num_examples * size > CACHE_BYTES:
      return self.draw(index)
    if self._cache is None:
      with _DRAWING:
        if self._cache is None:
          items = [self.draw(i) for i in range(self.num_examples)]  # subclasses: one example
          cache = {k: np.stack([e[k] for e in items]) for k in items[0]}
          for v in cache.values():
            v.flags.writeable = False
          self._cache = cache
    return {k: v[index] for k, v in self._cache.items()}

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(split={self.split!r}, num_examples={self.num_examples}, "
            f"image_size={self.image_size}, seed={self.seed})")


class SyntheticImageSource(Source):
  num_classes = len(IMAGE_CLASSES)
  class_names = IMAGE_CLASSES

  def draw(self, index: int) -> dict[str, np.ndarray]:
    rng = self._rng(index)
    label = int(rng.integers(self.num_classes))
    return {"image": render_image(label, rng, self.image_size), "label": np.int32(label)}


class SyntheticVideoSource(Source):
  num_classes = len(MOTIONS)
  class_names = MOTIONS

  def __init__(self, split: str, num_examples: int, image_size: int, num_frames: int,
               seed: int = 0):
    super().__init__(split, num_examples, image_size, seed)
    self.num_frames = num_frames

  def draw(self, index: int) -> dict[str, np.ndarray]:
    rng = self._rng(index)
    label = int(rng.integers(self.num_classes))
    clip = render_clip(label, rng, self.num_frames, self.image_size)
    return {"image": clip, "label": np.int32(label)}


def num_examples(data: ml_collections.ConfigDict, split: str) -> int:
  """A built-in split's size: config.data.train_examples / eval_examples."""
  return int(data.train_examples if split == data.train_split else data.eval_examples)


def build_dataset(data: ml_collections.ConfigDict, split: str, train: bool) -> DatasetSpec:
  """synthetic_image (flipped in training if random_flip) or synthetic_video (no flip: it
  would swap 'left' and 'right', as for Something-Something)."""
  size, n, seed = data.image_size, num_examples(data, split), data.generator_seed
  if data.name == "synthetic_image":
    source = SyntheticImageSource(split, n, size, seed=seed)
    flip = (RandomFlip(),) if train and data.random_flip else ()
    return DatasetSpec(source, source.num_classes, (size, size, 3),
                       flip + (Normalize(IMAGENET_MEAN, IMAGENET_STD),))
  if data.num_frames <= 0:
    raise ValueError("synthetic_video needs config.data.num_frames > 0")
  source = SyntheticVideoSource(split, n, size, data.num_frames, seed=seed)
  return DatasetSpec(source, source.num_classes, (data.num_frames, size, size, 3),
                     (Normalize(VIDEO_MEAN, VIDEO_STD),))
