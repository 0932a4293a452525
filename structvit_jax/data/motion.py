"""synthetic_motion: random-dot kinematograms, a built-in motion-only video dataset.

Every frame is N dots at independent uniform positions on a size x size torus, white on
black; the class is only in how consecutive frames relate. From frame t to t+1 each dot,
independently with probability `coherence`, moves by `speed` pixels in the class direction
(8 directions, 45 degrees apart), otherwise it is replotted at a new uniform position
(Newsome & Pare's random-dot motion stimulus). Positions wrap around the borders.

Why single frames carry no class information, by construction: a translation of the torus
maps the uniform distribution to itself, and a replotted dot is uniform whatever it was, so
every frame of every class is N i.i.d. uniform dots. Moreover all random draws (start
positions, which dots move coherently, replot positions) are made before the class is used:
for a given rng state frame 0 is the same array for every class, and only where the
coherent dots go depends on it. Rotation and expansion are left out on purpose: on a
bounded frame they change the local dot density (dots pile up or thin out), which a single
frame would give away.

Knobs (config.data): image_size, num_frames, coherence (share of dots moving coherently at
each step; 1: all, 0: pure noise, chance), speed (pixels per frame), dot_density (dots per
pixel). Like the other built-in datasets (synthetic.py) every example comes from
`np.random.default_rng((seed, split_id, index))`: seeded, deterministic, splits disjoint.

One clip as a lossless GIF (e.g. for `python -m structvit_jax.visualize --input=...`):

  python -m structvit_jax.data.motion --out=right.gif --direction=right [--coherence=1]
"""

from __future__ import annotations

import ml_collections
import numpy as np

from structvit_jax.data.ops import Normalize
from structvit_jax.data.spec import VIDEO_MEAN, VIDEO_STD, DatasetSpec
from structvit_jax.data.synthetic import Source, num_examples

# Class k moves at angle k * 45 degrees on screen (x right, y down).
DIRECTIONS = ("right", "down_right", "down", "down_left", "left", "up_left", "up", "up_right")
DEFAULTS = dict(coherence=0.5, speed=2.0, dot_density=0.08)


def direction_vector(direction: int, speed: float) -> np.ndarray:
  """(dx, dy) in pixels per frame of class `direction` (y grows downwards)."""
  a = int(direction) * np.pi / 4
  return speed * np.array([np.cos(a), np.sin(a)])


def render_dots(direction: int, rng: np.random.Generator, num_frames: int, size: int,
                coherence: float = DEFAULTS["coherence"], speed: float = DEFAULTS["speed"],
                dot_density: float = DEFAULTS["dot_density"],
                return_positions: bool = False):
  """One synthetic_motion clip of class `direction` (see DIRECTIONS): uint8 [T, size, size, 3].

  With return_positions, also returns the dot positions (x, y) [T, N, 2] in pixels.
  """
  if not 0.0 <= coherence <= 1.0:
    raise ValueError(f"coherence={coherence} must be in [0, 1]")
  n = max(1, int(round(dot_density * size * size)))
  # Every draw is made here, before `direction` is used (module docstring).
  start = rng.uniform(0.0, size, (n, 2))
  coherent = rng.random((num_frames - 1, n)) < coherence
  replot = rng.uniform(0.0, size, (num_frames - 1, n, 2))
  v = direction_vector(direction, speed)
  positions = [start]
  for t in range(num_frames - 1):
    positions.append(np.where(coherent[t, :, None], positions[-1] + v, replot[t]) % size)
  positions = np.stack(positions)
  pix = np.floor(positions).astype(np.int64) % size  # % again: float % can give `size`
  clip = np.zeros((num_frames, size, size), np.uint8)
  clip[np.arange(num_frames)[:, None], pix[..., 1], pix[..., 0]] = 255
  clip = np.repeat(clip[..., None], 3, axis=-1)
  return (clip, positions) if return_positions else clip


class SyntheticMotionSource(Source):
  """Random-access source of synthetic_motion clips {'image': uint8 [T, S, S, 3], 'label'}."""
  num_classes = len(DIRECTIONS)
  class_names = DIRECTIONS

  def __init__(self, split: str, num_examples: int, image_size: int, num_frames: int,
               seed: int = 0, coherence: float = DEFAULTS["coherence"],
               speed: float = DEFAULTS["speed"], dot_density: float = DEFAULTS["dot_density"]):
    super().__init__(split, num_examples, image_size, seed)
    if num_frames < 2:
      raise ValueError(f"synthetic_motion needs num_frames >= 2 (motion), got {num_frames}")
    self.num_frames = num_frames
    self.knobs = dict(coherence=float(coherence), speed=float(speed),
                      dot_density=float(dot_density))

  def draw(self, index: int) -> dict[str, np.ndarray]:
    rng = self._rng(index)
    label = int(rng.integers(self.num_classes))
    clip = render_dots(label, rng, self.num_frames, self.image_size, **self.knobs)
    return {"image": clip, "label": np.int32(label)}

  def __repr__(self) -> str:
    return f"{super().__repr__()[:-1]}, num_frames={self.num_frames}, {self.knobs})"


def build_dataset(data: ml_collections.ConfigDict, split: str, train: bool) -> DatasetSpec:
  """The builder of config.data.name == 'synthetic_motion' (no augmentation: a flip would
  swap directions)."""
  del train
  size, frames = data.image_size, data.num_frames
  source = SyntheticMotionSource(
      split, num_examples(data, split), size, frames,
      seed=data.get("generator_seed", 0),
      **{k: float(data.get(k, v)) for k, v in DEFAULTS.items()})
  # config.data.mean / std (base default: the video datasets' 0.45 / 0.225); the dots' own
  # statistics are about 0.08 / 0.27 (dot_density; benchmarks/table1.py's DeiT uses them).
  norm = Normalize(tuple(data.get("mean", VIDEO_MEAN)), tuple(data.get("std", VIDEO_STD)))
  return DatasetSpec(source, source.num_classes, (frames, size, size, 3), (norm,))


def write_gif(path: str, clip: np.ndarray, frame_ms: int = 125) -> None:
  """uint8 [T, H, W, 3] -> GIF, frame for frame (PyAV decodes it back unchanged)."""
  from PIL import Image
  frames = [Image.fromarray(f) for f in clip]
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0,
                 optimize=False, disposal=1)


def main(argv: list[str] | None = None) -> None:
  import argparse
  p = argparse.ArgumentParser(description="Write one synthetic_motion clip as a GIF.")
  p.add_argument("--out", required=True)
  p.add_argument("--direction", default="right", choices=DIRECTIONS)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--frames", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  for k, v in DEFAULTS.items():
    p.add_argument(f"--{k}", type=float, default=v)
  a = p.parse_args(argv)
  clip = render_dots(DIRECTIONS.index(a.direction), np.random.default_rng(a.seed), a.frames,
                     a.size, **{k: getattr(a, k) for k in DEFAULTS})
  write_gif(a.out, clip)
  print(f"wrote {a.out}: {a.direction}, {clip.shape}")


if __name__ == "__main__":
  main()
