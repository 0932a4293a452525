"""The input pipeline on the built-in synthetic datasets: determinism, per-process sharding,
exact evaluation, resumable iterators, and what the synthetic labels mean."""

import hashlib
import os

import numpy as np
import pytest

from structvit_jax import config_utils
from structvit_jax.data import DatasetNotFoundError, create_input, synthetic

base = config_utils.import_sibling(
    os.path.join(os.path.dirname(__file__), "..", "configs", "base.py"), "base")


def _config(name="synthetic_image", size=8, frames=0, train=96, eval_=100, flip=False,
            workers=0):
  c = base.get_base_config()
  c.data.name, c.data.image_size, c.data.num_frames = name, size, frames
  c.data.train_examples, c.data.eval_examples = train, eval_
  c.data.random_flip = flip
  c.data.num_workers = workers
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _keys(batch, mask=None):
  """One fingerprint per example (the normalised pixels identify it)."""
  keep = np.ones(len(batch["label"]), bool) if mask is None else mask
  return [hashlib.sha1(x.tobytes()).hexdigest() for x, k in zip(batch["image"], keep) if k]


def _all_keys(c, split_name):
  """Fingerprints of every example of a split, from one eval batch holding all of it."""
  c = c.copy_and_resolve_references()
  c.data.eval_split = split_name
  n = c.data.train_examples if split_name == c.data.train_split else c.data.eval_examples
  return _keys(next(create_input(c, "eval", local_batch_size=n).make_eval_iterator()))


def test_batches_shapes_dtypes_and_determinism():
  c = _config(flip=True)
  a = _take(create_input(c, "train", 8, seed=3).iterator, 3)
  b = _take(create_input(c, "train", 8, seed=3).iterator, 3)
  d = _take(create_input(c, "train", 8, seed=4).iterator, 3)
  assert a[0]["image"].shape == (8, 8, 8, 3) and a[0]["image"].dtype == np.float32
  assert a[0]["label"].shape == (8,) and a[0]["label"].dtype == np.int32
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["image"], d[0]["image"])
  # Normalised like real data (ImageNet mean/std): roughly centred, unit scale.
  img = np.concatenate([x["image"] for x in a])
  assert -1.0 < img.mean() < 1.0 and 0.5 < img.std() < 2.0


def test_two_processes_disjoint_cover_split_and_match_one_process():
  c = _config(flip=True)                       # flips included: augmentation too must match
  p0 = _take(create_input(c, "train", 8, 0, 2, seed=0).iterator, 12)
  p1 = _take(create_input(c, "train", 8, 1, 2, seed=0).iterator, 12)
  single = _take(create_input(c, "train", 16, 0, 1, seed=0).iterator, 12)
  for a, b, s in zip(p0, p1, single):           # global batch = the processes' batches, in order
    np.testing.assert_array_equal(np.concatenate([a["image"], b["image"]]), s["image"])
    np.testing.assert_array_equal(np.concatenate([a["label"], b["label"]]), s["label"])
  c.data.random_flip = False                    # now pixels identify examples
  p0 = _take(create_input(c, "train", 8, 0, 2, seed=0).iterator, 12)
  p1 = _take(create_input(c, "train", 8, 1, 2, seed=0).iterator, 12)
  everything = set(_all_keys(c, "train"))
  for epoch in (slice(0, 6), slice(6, 12)):     # 96 examples / global batch 16 = 6 steps
    k0 = [k for b in p0[epoch] for k in _keys(b)]
    k1 = [k for b in p1[epoch] for k in _keys(b)]
    assert not set(k0) & set(k1)
    assert sorted(k0 + k1) == sorted(everything)
  order = lambda bs: [k for b in bs for k in _keys(b)]  # noqa: E731
  assert order(p0[:6]) != order(p0[6:])         # reshuffled every epoch


def test_eval_covers_every_example_once_with_padding():
  c = _config(eval_=100)
  keys, masks, counts = [], [], []
  for p in range(2):
    inp = create_input(c, "eval", 8, p, 2)
    assert inp.num_examples == 100 and inp.num_eval_batches == 7   # ceil(100 / 16)
    batches = list(inp.make_eval_iterator())
    counts.append(len(batches))
    for b in batches:
      assert b["mask"].dtype == np.bool_ and b["image"].shape == (8, 8, 8, 3)
      keys += _keys(b, b["mask"])
      masks.append(b["mask"])
  assert counts == [7, 7]
  assert len(keys) == len(set(keys)) == 100
  assert sorted(keys) == sorted(_all_keys(c, "validation"))
  assert np.concatenate(masks).sum() == 100 and np.concatenate(masks).size == 112
  # A second pass is a fresh iterator with the same content.
  again = list(create_input(c, "eval", 8, 0, 2).make_eval_iterator())
  assert len(again) == 7


def test_splits_are_disjoint():
  c = _config(train=50, eval_=50)
  assert not set(_all_keys(c, "train")) & set(_all_keys(c, "validation"))


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_resumes_with_the_next_batches(workers):
  c = _config(flip=True, workers=workers)
  it = create_input(c, "train", 8, seed=1).iterator
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)                       # crosses the epoch boundary (12 steps/epoch)
  fresh = create_input(c, "train", 8, seed=1).iterator
  fresh.set_state(state)
  for e, g in zip(expected, _take(fresh, 4)):
    np.testing.assert_array_equal(e["image"], g["image"])
    np.testing.assert_array_equal(e["label"], g["label"])
  if workers:
    it.close()
    fresh.close()


def test_video_batches_and_class_is_the_motion():
  c = _config("synthetic_video", size=16, frames=4, train=32, eval_=20)
  inp = create_input(c, "train", 4)
  b = next(inp.iterator)
  assert b["image"].shape == (4, 4, 16, 16, 3) and inp.input_shape == (4, 16, 16, 3)
  assert inp.num_classes == len(synthetic.MOTIONS) == 8

  def clip(motion, seed):
    return synthetic.render_clip(motion, np.random.default_rng(seed), 8, 32, return_states=True)

  clips = [clip(m, 7) for m in range(8)]
  for m in range(1, 8):  # same appearance seed: identical first frame, whatever the class
    np.testing.assert_array_equal(clips[m][0][0], clips[0][0][0])
    assert not np.array_equal(clips[m][0][-1], clips[0][0][-1])
  for m, name in enumerate(synthetic.MOTIONS):
    for seed in (7, 8):
      states = clip(m, seed)[1]               # per frame (cx, cy, radius, angle)
      delta = states[-1] - states[0]
      want = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1),
              "clockwise": (3, 1), "counterclockwise": (3, -1), "expand": (2, 1),
              "shrink": (2, -1)}[name]
      assert np.sign(delta[want[0]]) == want[1], (name, delta)
      assert np.count_nonzero(np.abs(delta) > 1e-6) == 1, (name, delta)  # only that moves
  # Same class, different appearance seeds: different pixels, same label.
  a, b = clip(0, 1)[0], clip(0, 2)[0]
  assert np.abs(a.astype(int) - b.astype(int)).mean() > 20


def test_image_classes_are_shape_and_stripes():
  assert len(synthetic.IMAGE_CLASSES) == 10
  src = synthetic.SyntheticImageSource("train", 200, 32)
  labels = [int(src[i]["label"]) for i in range(200)]
  assert set(labels) == set(range(10))        # every class occurs
  img = src[0]["image"]
  assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
  np.testing.assert_array_equal(img, src[0]["image"])   # deterministic per index


@pytest.mark.parametrize("name", ["imagenet2012"])  # videos: test_video_data.py
def test_real_datasets_fail_fast_with_a_clear_message(name):
  c = _config(name)
  c.data.data_dir = "/nonexistent/data"
  with pytest.raises(DatasetNotFoundError, match=name) as e:
    create_input(c, "train", 8)
  assert "/nonexistent/data" in str(e.value) and "synthetic" in str(e.value)


def test_unknown_dataset_and_bad_arguments():
  with pytest.raises(ValueError, match="valid names"):
    create_input(_config("imagenet"), "train", 8)
  with pytest.raises(ValueError, match="split"):
    create_input(_config(), "validation", 8)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    create_input(_config(train=10), "train", 8, 0, 2)


@pytest.mark.parametrize("steps,whole", [(2, False), (20, True), (-1, True)])
def test_built_in_split_is_drawn_whole_only_for_more_than_one_pass(steps, whole, monkeypatch):
  """2 steps of 8 read 16 of 96 examples: each is drawn when read (and a few read ahead).
  20 steps (160 reads) or epochs (num_epochs passes): the whole split at the first read,
  kept. The same pixels either way."""
  made, drawn = [], []
  init, draw = synthetic.SyntheticImageSource.__init__, synthetic.SyntheticImageSource.draw
  monkeypatch.setattr(synthetic.SyntheticImageSource, "__init__",
                      lambda self, *a, **k: made.append(self) or init(self, *a, **k))
  monkeypatch.setattr(synthetic.SyntheticImageSource, "draw",
                      lambda self, i: drawn.append(self) or draw(self, i))
  c = _config()
  c.num_train_steps = steps
  batches = _take(create_input(c, "train", local_batch_size=8, seed=1).iterator, 2)
  train_source = made[0]  # then the train split's eval-mode source, not read here
  count = sum(s is train_source for s in drawn)
  assert count == 96 if whole else 16 <= count < 48, count
  c.num_train_steps = 2 if whole else 20  # the other way: same examples, same pixels
  other = _take(create_input(c, "train", local_batch_size=8, seed=1).iterator, 2)
  assert [_keys(b) for b in batches] == [_keys(b) for b in other]
