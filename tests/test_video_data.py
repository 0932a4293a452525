"""Video datasets on tiny mp4 files written here with PyAV: list files, the documented dense
and segment frame indices (on videos whose frames encode their own index), test views,
multi-view evaluation, bad videos, the missing-dataset error, and K400 / SSv2 recipes end
to end with a tiny model."""

import functools
import logging
import os
import pathlib

import av
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structvit_jax import config_utils, evaluation, train, train_state
from structvit_jax.data import DatasetNotFoundError, create_input, video

REPO = pathlib.Path(__file__).resolve().parents[1]
FAST_COMPILES = True  # XLA's cheap compile mode: the end-to-end recipes' compiles (conftest.py)
LEVEL = 6            # frame i is flat grey i * LEVEL: its index survives compression


def load(name, arg=None):
  return config_utils.import_sibling(str(REPO / "configs" / "x.py"), name).get_config(arg)


def write_video(path, num_frames=40, width=64, height=48, fps=30, pattern="index", seed=0,
                gop=0):
  """libx264 mp4; 'index': frame i flat grey i*LEVEL (lossless), 'noise': 8x8 blocks;
  gop > 0: a keyframe every gop frames (and B-frames), so that seeking lands mid-video."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  with av.open(str(path), "w") as c:
    s = c.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = width, height, "yuv420p"
    s.options = {"crf": "0" if pattern == "index" else "23",
                 **({"g": str(gop), "bf": "2"} if gop else {})}
    for i in range(num_frames):
      if pattern == "index":
        a = np.full((height, width, 3), (i * LEVEL) % 256, np.uint8)
      else:
        a = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        a = a.repeat(8, 0).repeat(8, 1)[:height, :width]
      for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def frame_index(clip_u8_or_normalised):
  """Per-frame index of an index-coded clip (uint8, or normalised with 0.45/0.225)."""
  x = np.asarray(clip_u8_or_normalised)
  if x.dtype != np.uint8:
    x = (x * 0.225 + 0.45) * 255.0
  return np.round(x.reshape(x.shape[0], -1).mean(1) / LEVEL).astype(int)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """DATA_DIR with index-coded videos of 40 and 25 frames, lists train.csv / val.csv."""
  root = tmp_path_factory.mktemp("videos")
  lengths = [40, 25, 40, 40, 25, 40, 40, 40]
  for i, n in enumerate(lengths):
    write_video(root / "clips" / f"v{i}.mp4", num_frames=n)
  (root / "train.csv").write_text(
      "".join(f"clips/v{i}.mp4   {i % 3}\n" for i in range(6)) + "\n# comment\n")
  (root / "val.csv").write_text("".join(f"  clips/v{i}.mp4 {i % 3}\n" for i in (6, 7, 1)))
  return root


def video_config(data_dir, name="k400_s", frames=4, size=32, **data):
  c = load(name)
  c.data.data_dir = str(data_dir)
  c.data.num_frames, c.data.image_size, c.data.num_workers = frames, size, 0
  c.data.scale_jitter = (size, size + 8)
  for k, v in data.items():
    c.data[k] = v
  return c


# ----------------------------------------------------------------------------- list files


def test_list_file_parsing_and_errors(tmp_path):
  f = tmp_path / "l.csv"
  f.write_text("a/b c.mp4 \t 3 \n\n# skipped\n  x.mp4 0\n")
  assert video.read_list(str(f), "/r", 5) == [("/r/a/b c.mp4", 3), ("/r/x.mp4", 0)]
  f.write_text("ok.mp4 1\nno_label.mp4\n")
  with pytest.raises(ValueError, match=r"l\.csv:2: expected 'relative/path\.mp4 label'"):
    video.read_list(str(f), "/r", 5)
  f.write_text("a.mp4 7\n")
  with pytest.raises(ValueError, match=r"l\.csv:1: label 7 not in \[0, 5\)"):
    video.read_list(str(f), "/r", 5)


def test_missing_dataset_is_one_clear_error(tmp_path, data_dir):
  c = video_config(tmp_path / "nowhere")
  with pytest.raises(DatasetNotFoundError,
                     match="nowhere' does not exist.*train.csv and val.csv.*data_dir=DATA_DIR"):
    create_input(c, "train", 2)
  c.data.data_dir = ""
  with pytest.raises(DatasetNotFoundError, match="data_dir is not set"):
    create_input(c, "train", 2)
  c = video_config(data_dir, train_list="missing.csv")
  with pytest.raises(DatasetNotFoundError, match=r"list file .*missing\.csv' does not exist"):
    create_input(c, "train", 2)


# ----------------------------------------------------------------------------- sampling


def test_sampling_formulae():
  # dense: 4 frames, rate 4 -> window 13; L=40 -> delta 27.
  assert list(video.dense_indices(40, 4, 4)) == [13, 17, 21, 25]          # centred: 27 // 2
  clips = [list(video.dense_indices(40, 4, 4, clip=k, num_clips=4)) for k in range(4)]
  assert clips == [[0, 4, 8, 12], [9, 13, 17, 21], [18, 22, 26, 30], [27, 31, 35, 39]]
  assert list(video.dense_indices(10, 4, 4)) == [0, 4, 8, 9]              # clamped to L-1
  rng = np.random.default_rng(0)
  starts = {int(video.dense_indices(40, 4, 4, rng)[0]) for _ in range(400)}
  assert starts == set(range(28))                                          # all valid starts
  # segment (SlowFast ssv2): L=40, N=4 -> s=9.75, segments [0,10] [10,20] [20,29] [29,39].
  assert list(video.segment_indices(40, 4)) == [5, 15, 24, 34]
  assert list(video.segment_indices(40, 4, clip=0, num_clips=2)) == [2, 12, 22, 31]
  draws = np.stack([video.segment_indices(40, 4, rng) for _ in range(400)])
  for i, (lo, hi) in enumerate([(0, 10), (10, 20), (20, 29), (29, 39)]):
    assert set(draws[:, i]) == set(range(lo, hi + 1))
  # test crops (SlowFast uniform_crop) of a 32 x 42 frame and of a portrait 42 x 32 one
  assert [video.crop_offset(32, 42, 32, k, 3) for k in range(3)] == [(0, 0), (0, 5), (0, 10)]
  assert [video.crop_offset(42, 32, 32, k, 3) for k in range(3)] == [(0, 0), (5, 0), (10, 0)]
  assert video.crop_offset(32, 42, 32, 0, 1) == (0, 5)
  assert video.short_side_shape(48, 64, 32) == (32, 42)


def test_decoder_returns_the_requested_frames(data_dir, tmp_path):
  path = str(data_dir / "clips" / "v0.mp4")
  with video.VideoReader(path) as r:
    assert r.num_frames == 40
    idx = np.array([3, 3, 0, 39, 17])                     # any order, repeats
    frames = r.read(idx, 32)
    assert frames.shape == (5, 32, 42, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frame_index(frames), idx)
  # Seeks (first index >= SEEK_MIN_FRAMES) to the keyframe before, here frame 0 or 32.
  assert video.SEEK_MIN_FRAMES <= 33
  gop = str(tmp_path / "gop8.mp4")
  write_video(gop, gop=8)
  for p in (path, gop):
    for idx in ([33, 36, 39], [35], [32, 33], [38, 39], [39, 39, 34]):
      with video.VideoReader(p) as r:
        np.testing.assert_array_equal(frame_index(r.read(np.array(idx), 48)), idx)


@pytest.mark.parametrize("sampling", ["dense", "segment"])
def test_pipeline_picks_the_documented_frames(data_dir, sampling):
  c = video_config(data_dir, sampling=sampling, sampling_rate=4, test_clips=2, test_crops=3,
                   randaugment="", random_erase=0.0)      # pixel values must keep the index
  lengths = [40, 40, 25]                                     # val.csv: v6, v7, v1
  sample = (functools.partial(video.dense_indices, num=4, rate=4) if sampling == "dense" else
            functools.partial(video.segment_indices, num=4))
  # eval: every (video, view) once; view = clip * 3 + crop; frames at the fixed positions
  inp = create_input(c, "eval", local_batch_size=4)
  seen = []
  for b in inp.make_eval_iterator():
    assert b["image"].shape == (4, 4, 32, 32, 3) and b["image"].dtype == np.float32
    seen += [int(v) for v, m in zip(b["video_id"], b["mask"]) if m]
  assert sorted(seen) == sorted([0, 1, 2] * 6)
  src = create_input(c, "eval", 18).make_eval_iterator()
  b = next(src)
  views = [(v, k) for v in range(3) for k in range(6)]
  assert [(int(v), int(k)) for v, k in zip(b["video_id"], b["view"])] == views
  for (v, k), img in zip(views, b["image"]):
    np.testing.assert_array_equal(frame_index(img), sample(lengths[v], clip=k // 3, num_clips=2))
  # train: random windows / per-segment draws, consistent with the formulae
  it = create_input(c, "train", 3, seed=1).iterator
  for _ in range(4):
    b = next(it)
    assert b["image"].shape == (3, 4, 32, 32, 3) and not b["bad"].any()
    for img in b["image"]:
      idx = frame_index(img)
      if sampling == "dense":
        assert (np.diff(idx) == 4).all() or idx[-1] == 24    # contiguous, or clamped (L=25)
      else:
        assert (np.diff(idx) >= 0).all()                      # segments share end points
  a = next(create_input(c, "train", 3, seed=1).iterator)
  b = next(create_input(c, "train", 3, seed=1).iterator)
  np.testing.assert_array_equal(a["image"], b["image"])     # deterministic given the seed


def test_randaugment_and_erasing_treat_every_frame_alike():
  frame = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  clip = np.stack([frame] * 4)
  ra = video.VideoRandAugment("rand-m7-n4-mstd0.5-inc1", (0.45,) * 3)
  changed = 0
  for seed in range(5):
    out = ra.random_map({"image": clip}, np.random.default_rng(seed))["image"]
    assert out.shape == clip.shape and out.dtype == np.uint8
    assert all(np.array_equal(out[0], f) for f in out)   # same ops + magnitudes per frame
    changed += not np.array_equal(out[0], frame)
  assert changed >= 3
  x = np.zeros((4, 32, 32, 3), np.float32)
  out = video.RandomErasing(1.0).random_map({"image": x}, np.random.default_rng(0))["image"]
  boxes = out != 0
  assert boxes.any() and all(np.array_equal(boxes[0], b) for b in boxes)  # one box, all frames
  assert not np.array_equal(out[0], out[1])              # fresh noise per frame


# ----------------------------------------------------------------------------- bad data


def test_corrupt_and_missing_videos_are_skipped_counted_and_logged_once(tmp_path, data_dir,
                                                                         caplog):
  root = tmp_path / "d"
  (root / "clips").mkdir(parents=True)
  for i in range(2):
    os.link(data_dir / "clips" / f"v{i}.mp4", root / "clips" / f"v{i}.mp4")
  (root / "clips" / "corrupt.mp4").write_bytes(os.urandom(3000))
  lines = "clips/v0.mp4 0\nclips/corrupt.mp4 1\nclips/v1.mp4 2\nclips/gone.mp4 1\n"
  (root / "train.csv").write_text(lines)
  (root / "val.csv").write_text(lines)
  c = video_config(root, test_clips=1, test_crops=1)
  caplog.set_level(logging.WARNING)
  it = create_input(c, "train", 4, seed=0).iterator
  batches = [next(it) for _ in range(6)]                   # 6 epochs: each bad one 6 times
  bad = np.concatenate([b["bad"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert bad.dtype == np.int32 and bad.sum() == 12
  assert set(labels[bad == 1]) <= {0, 2}                   # replaced by readable videos
  for b in batches:
    assert (np.abs(b["image"]).reshape(4, -1).max(1) > 0).all()
  for name in ("corrupt.mp4", "gone.mp4"):
    assert sum(name in r.getMessage() for r in caplog.records) == 1, name
  # eval: unreadable views are masked out and counted, the others evaluated once
  b = next(create_input(c, "eval", 4).make_eval_iterator())
  np.testing.assert_array_equal(b["mask"], [True, False, True, False])
  np.testing.assert_array_equal(b["bad"], [0, 1, 0, 1])


# ----------------------------------------------------------------------------- evaluation


class MeanPixelModel(nn.Module):
  """No parameters: logits from the clip's per-frame means, so views score differently."""
  num_classes: int = 5

  @nn.compact
  def __call__(self, x, train=False):
    m = x.mean(axis=(2, 3, 4))                               # [B, T]
    return jnp.stack([jnp.sin((k + 1) * m.sum(1)) * 3 for k in range(self.num_classes)], -1)


def test_multi_view_eval_averages_softmax_per_video_once(data_dir):
  c = video_config(data_dir, sampling="dense", sampling_rate=4, test_clips=4, test_crops=1,
                   num_classes=5)
  inp = create_input(c, "eval", local_batch_size=5)        # 12 views -> 3 batches, 3 padding
  model = MeanPixelModel()
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  eval_fn = jax.jit(functools.partial(train_state.eval_step, model=model,
                                      outputs=evaluation.MultiViewVideo.outputs))
  got = train_state.run_eval(eval_fn, {}, {}, inp, mesh, evaluation.MultiViewVideo(True))
  # reference: softmax per view, mean over each video's 4 views, then top-1
  probs, labels = {}, {}
  for b in inp.make_eval_iterator():
    p = jax.nn.softmax(model.apply({}, b["image"]))
    for pi, v, lab, m in zip(np.asarray(p), b["video_id"], b["label"], b["mask"]):
      if m:
        probs.setdefault(int(v), []).append(pi)
        labels[int(v)] = int(lab)
  assert sorted(len(p) for p in probs.values()) == [4, 4, 4]
  pred = {v: int(np.argmax(np.mean(p, 0))) for v, p in probs.items()}
  top1 = np.mean([pred[v] == labels[v] for v in probs])
  assert (got["count"], got["views"]) == (3, 12)
  assert got["top1"] == pytest.approx(top1)
  per_class = [np.mean([pred[v] == k for v in probs if labels[v] == k]) for k in {0, 1}]
  assert got["mean_class_top1"] == pytest.approx(np.mean(per_class))
  # two processes: disjoint (video, view) pairs whose union is every view exactly once
  pairs = []
  for p in range(2):
    it = create_input(c, "eval", 2, process_index=p, process_count=2).make_eval_iterator()
    for b in it:
      pairs += [(int(v), int(k)) for v, k, m in zip(b["video_id"], b["view"], b["mask"]) if m]
  assert sorted(pairs) == [(v, k) for v in range(3) for k in range(4)]


def test_video_metrics_mean_per_class():
  probs = np.array([[.9, .1], [.2, .8], [.6, .4], [.3, .7], [.1, .9]], np.float32)
  chunk = dict(probs=probs, video_id=np.array([0, 0, 1, 2, 2]), label=np.array([0, 0, 1, 1, 1]),
               mask=np.array([True, True, True, True, False]))
  m = evaluation.video_metrics([chunk], mean_per_class=True)
  # video 0: mean [.55,.45] -> 0 (right); 1 -> 0 (wrong); 2 -> 1 (right; masked view ignored)
  assert (m["count"], m["views"], m["top1"]) == (3, 4, pytest.approx(2 / 3))
  assert m["mean_class_top1"] == pytest.approx((1.0 + 0.5) / 2)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """The two recipes below compile the same programs (same tiny model, classes, shapes): a
  persistent compilation cache lets the second reuse the first's (~60 s -> ~8 s here)."""
  from jax._src import compilation_cache as cc
  keys = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
          "jax_persistent_cache_min_compile_time_secs": 0.0,
          "jax_persistent_cache_min_entry_size_bytes": -1}
  old = {k: getattr(jax.config, k) for k in keys}
  for k, v in keys.items():
    jax.config.update(k, v)
  cc.reset_cache()  # the cache is set up once per process, at the first compile
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  cc.reset_cache()


@pytest.mark.parametrize("name,views", [("k400_s", 4), ("ssv2_s", 3)])
def test_recipe_trains_and_evaluates_end_to_end(tmp_path, data_dir, compilation_cache, name,
                                                views):
  c = video_config(data_dir, name, num_classes=3)
  c.model.name = "structvit_tiny"
  c.model.kwargs.drop_path_rate = 0.1
  c.batch_size = c.eval_batch_size = 4
  c.lr_base_batch_size = 4
  c.num_train_steps = 2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 100
  c.eval_every_epochs = 100.0
  state, results = train.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])
  assert int(state.step) == 2
  assert (results["eval/count"], results["eval/views"]) == (3, 3 * views)
  assert np.isfinite(results["eval/loss"]) and 0 <= results["eval/top1"] <= 1
