"""Multi-view video prediction: an export records the evaluation's test views (clips x
crops); predict / inference score a video as evaluation does, the softmax averaged over
exactly the eval pipeline's views; --views=single keeps the one centre view."""

import pathlib
import sys

import jax
import numpy as np
import pytest

from structvit_jax import cli, inference, predict
from structvit_jax.data import video
from structvit_jax.data.preprocessing import eval_spec, eval_views
from structvit_jax.models import get_model

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_train import tiny_config  # noqa: E402
from test_video_data import video_config, write_video  # noqa: E402

FAST_COMPILES = True  # XLA's cheap compile mode for this module (conftest.py)
CLASSES = [f"c{i}" for i in range(8)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A 64x48 noise video (its views all differ), its k400-style eval config with 2 clips x
  3 crops, and a timesformer_tiny export recording that config's eval input and views."""
  root = tmp_path_factory.mktemp("views")
  write_video(root / "clip.mp4", num_frames=40, pattern="noise")
  (root / "val.csv").write_text("clip.mp4 3\n")
  config = video_config(root, sampling="dense", sampling_rate=2, test_clips=2, test_crops=3,
                        num_classes=8)
  model = get_model("timesformer_tiny", num_frames=4, num_classes=8)
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 4, 32, 32, 3), np.float32),
                         train=False)
  out = str(root / "export")
  inference.save_export(out, "timesformer_tiny", dict(num_frames=4, num_classes=8), variables,
                        {**eval_spec(config.data), **eval_views(config.data)}, CLASSES)
  return str(root / "clip.mp4"), config, inference.load(out)


def _eval_pipeline_views(config) -> np.ndarray:
  """The uint8 views the trainer's eval pipeline scores for the one listed video."""
  ds = video.build_dataset(config.data, "val", train=False)
  decode = next(op for op in ds.transforms if isinstance(op, video.DecodeEvalClip))
  return np.stack([decode.map(ds.source[i])["image"] for i in range(len(ds.source))])


def test_export_records_the_eval_views():
  k400 = tiny_config(**{"data.name": "kinetics400", "data.num_frames": 8})
  k400.data.test_clips, k400.data.test_crops = 4, 3
  assert eval_views(k400.data) == dict(test_clips=4, test_crops=3)
  # Evaluated one view per example: nothing recorded, one view predicted.
  assert eval_views(tiny_config(**{"data.name": "synthetic_video", "data.num_frames": 4}).data
                    ) == {}
  assert eval_views(tiny_config().data) == {}
  old = dict(kind="video", image_size=32, num_frames=4, mean=[0.45] * 3, std=[0.225] * 3)
  spec = inference._check_input_spec(old)  # an export written before views
  assert (spec["test_clips"], spec["test_crops"]) == (1, 1)


def test_multi_view_predict_is_the_mean_over_the_eval_views(setup, monkeypatch, capsys):
  path, config, pred = setup
  assert pred.view_grid() == (2, 3) and pred.view_grid("single") == (1, 1)
  assert pred.view_grid("4x1") == pred.view_grid((4, 1)) == (4, 1)
  with pytest.raises(ValueError, match="'eval', 'single', or clips x crops"):
    pred.view_grid("4y3")
  views = pred.read_views(path)
  want_views = _eval_pipeline_views(config)
  assert views.shape == (6, 4, 32, 32, 3)
  np.testing.assert_array_equal(views, want_views)
  assert len({v.tobytes() for v in views}) == 6  # 2 clips x 3 crops, all different
  # By hand: normalise, logits per view, softmax per view, mean over the views.
  x = (want_views.astype(np.float32) / 255.0 - 0.45) / 0.225
  logits = pred.logits_batched(x, 8)
  want = np.asarray(jax.nn.softmax(logits, -1)).mean(0)
  got = pred.predict(path, batch_size=8)
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-7)
  assert not np.allclose(np.asarray(jax.nn.softmax(logits, -1)), want[None], atol=1e-4)
  # All of a video's frames as an array: the same views (frames already at size 32).
  with video.VideoReader(path) as reader:
    frames = reader.read(np.arange(reader.num_frames), 32)
  np.testing.assert_allclose(pred.predict(frames, batch_size=8), got, rtol=1e-5, atol=1e-7)
  # One view: the centre clip and crop, as before the views were recorded.
  single = pred.predict(path, batch_size=8, views="single")
  centre = video.ClipConfig(4, 32, "dense", 2).test_view(path)
  np.testing.assert_array_equal(pred.read(path), centre)
  np.testing.assert_allclose(single[0], np.asarray(jax.nn.softmax(
      pred.logits_batched(pred.preprocess_one(path)[None], 8), -1))[0], rtol=1e-5, atol=1e-7)
  assert not np.allclose(single, got, atol=1e-4)
  # The CLI: --views=eval (default) and single print those probabilities.
  monkeypatch.setattr(inference, "load", lambda model: pred)
  for flag, probs in (("eval", got[0]), ("single", single[0])):
    assert predict.run("EXPORT", [path], k=2, batch_size=8, views=flag) == 0
    lines = capsys.readouterr().out.splitlines()
    best = np.argsort(-probs, kind="stable")[:2]
    assert lines == [path] + [f"  {probs[j]:.4f}  {CLASSES[j]}" for j in best]
  with pytest.raises(cli.UserError, match="--views: views='2'"):
    predict.run("EXPORT", [path], views="2")
