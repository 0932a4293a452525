"""synthetic_motion (random-dot kinematograms): frames carry no class, frame pairs do."""

import ml_collections
import numpy as np
import pytest

from structvit_jax.data import create_input, get_dataset
from structvit_jax.data import motion, registry

SIZE, FRAMES = 32, 8


def _estimate_direction(f0: np.ndarray, f1: np.ndarray) -> int:
  """A non-learned block-matching estimator: the peak of the circular cross-correlation of
  two frames gives the displacement; its angle, rounded to 45 degrees, the class."""
  a, b = (f.astype(np.float64)[..., 0] for f in (f0, f1))
  a, b = a - a.mean(), b - b.mean()
  cc = np.real(np.fft.ifft2(np.conj(np.fft.fft2(a)) * np.fft.fft2(b)))
  dy, dx = np.unravel_index(np.argmax(cc), cc.shape)
  n = a.shape[0]
  dx, dy = (dx + n // 2) % n - n // 2, (dy + n // 2) % n - n // 2
  return int(np.round(np.arctan2(dy, dx) / (np.pi / 4))) % len(motion.DIRECTIONS)


def _accuracy(coherence: float, n: int = 160) -> float:
  hits = 0
  for i in range(n):
    label = i % len(motion.DIRECTIONS)
    clip = motion.render_dots(label, np.random.default_rng(i), 2, SIZE, coherence=coherence)
    hits += _estimate_direction(clip[0], clip[1]) == label
  return hits / n


def test_two_frames_tell_the_direction():
  # Far above chance (1/8) at full coherence; at chance without coherent dots, so it is the
  # motion the estimator reads.
  assert _accuracy(1.0) > 0.95
  assert _accuracy(0.0) < 0.3
  assert _accuracy(1.0) > _accuracy(0.5) > _accuracy(0.2) > _accuracy(0.0)


def test_single_frames_carry_no_class():
  # By construction: for one rng state, frame 0 is the same array for every class (every
  # draw precedes the use of the class), and the replotted dots are the same too.
  for i in range(4):
    clips, pos = zip(*(motion.render_dots(k, np.random.default_rng(i), FRAMES, SIZE,
                                          coherence=0.5, return_positions=True)
                       for k in range(len(motion.DIRECTIONS))))
    for c in clips[1:]:
      np.testing.assert_array_equal(c[0], clips[0][0])
    moved = ~np.isclose(pos[0], pos[1]).all(-1)  # dots whose position depends on the class
    assert moved[1].mean() == pytest.approx(0.5, abs=0.15) and not moved[0].any()
  # And in distribution, every frame t of every class is i.i.d. uniform dots: per-class
  # statistics of a later frame (dot count, centroid, occupancy per quadrant) agree.
  stats = []
  for k in range(len(motion.DIRECTIONS)):
    frames = np.stack([motion.render_dots(k, np.random.default_rng((7, k, i)), FRAMES, SIZE,
                                          coherence=1.0)[-1, ..., 0] > 0 for i in range(150)])
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    quad = frames.reshape(150, 2, SIZE // 2, 2, SIZE // 2).mean(axis=(0, 2, 4)).ravel()
    stats.append([frames.sum((1, 2)).mean() / frames[0].size,
                  (frames * xs).sum() / frames.sum() / SIZE,
                  (frames * ys).sum() / frames.sum() / SIZE, *quad])
  stats = np.asarray(stats)
  np.testing.assert_allclose(stats, np.broadcast_to(stats.mean(0), stats.shape), atol=0.015)
  assert stats[:, 0] == pytest.approx(1 - np.exp(-0.08), abs=0.005)  # Poisson occupancy


def test_knobs_and_geometry():
  clip, pos = motion.render_dots(0, np.random.default_rng(0), FRAMES, SIZE, coherence=1.0,
                                 speed=3.0, dot_density=0.05, return_positions=True)
  assert clip.shape == (FRAMES, SIZE, SIZE, 3) and clip.dtype == np.uint8
  assert set(np.unique(clip)) == {0, 255} and (clip[..., 0] == clip[..., 2]).all()
  assert pos.shape == (FRAMES, round(0.05 * SIZE * SIZE), 2)
  step = (pos[1:] - pos[:-1]) % SIZE  # full coherence: every dot moves by (3, 0), wrapping
  np.testing.assert_allclose(step, np.broadcast_to([3.0, 0.0], step.shape), atol=1e-9)
  np.testing.assert_allclose(motion.direction_vector(2, 2.0), [0.0, 2.0], atol=1e-12)  # down
  with pytest.raises(ValueError, match="coherence"):
    motion.render_dots(0, np.random.default_rng(0), FRAMES, SIZE, coherence=1.5)


def _config(**data) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict({
      **dict(name="synthetic_motion", image_size=SIZE, num_frames=FRAMES, num_workers=0,
             train_split="train", eval_split="validation", train_examples=64,
             eval_examples=20), **data})
  return c


def test_determinism_and_splits():
  spec = get_dataset(_config(coherence=0.3), "train", train=True)
  a, b = spec.source[5], spec.source[5]
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["label"] == b["label"]
  again = get_dataset(_config(coherence=0.3), "train", train=True).source[5]
  np.testing.assert_array_equal(a["image"], again["image"])
  val = get_dataset(_config(coherence=0.3), "validation", train=False).source[5]
  other_seed = get_dataset(_config(coherence=0.3, generator_seed=1), "train", True).source[5]
  assert not np.array_equal(a["image"], val["image"])
  assert not np.array_equal(a["image"], other_seed["image"])
  assert spec.source.knobs == dict(coherence=0.3, speed=2.0, dot_density=0.08)
  with pytest.raises(ValueError, match="num_frames"):
    get_dataset(_config(num_frames=0), "train", train=True)


def test_create_input():
  inp = create_input(_config(), "train", local_batch_size=8)
  assert inp.num_classes == 8 and inp.input_shape == (FRAMES, SIZE, SIZE, 3)
  batch = next(inp.iterator)
  assert batch["image"].shape == (8, FRAMES, SIZE, SIZE, 3)
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  assert 0 <= batch["label"].min() and batch["label"].max() < 8
  # Normalised (video mean/std): black background and white dots, nothing else.
  assert len(np.unique(batch["image"])) == 2
  ev = create_input(_config(), "eval", local_batch_size=8)
  masks = [b["mask"] for b in ev.make_eval_iterator()]
  assert ev.num_eval_batches == 3 and int(np.concatenate(masks).sum()) == 20


def test_export_class_names():
  from structvit_jax.data.preprocessing import eval_spec
  assert registry.class_names(_config().data) == list(motion.DIRECTIONS)
  assert eval_spec(_config().data)["sampling"] == "dense"


def test_gif_round_trip(tmp_path):
  path = str(tmp_path / "up.gif")
  motion.main([f"--out={path}", "--direction=up", "--coherence=1", "--seed=3"])
  clip = motion.render_dots(motion.DIRECTIONS.index("up"), np.random.default_rng(3), FRAMES,
                            SIZE, coherence=1.0)
  import av
  with av.open(path) as c:
    decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
  np.testing.assert_array_equal(decoded, clip)
