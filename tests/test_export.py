"""Export -> load -> predict: an exported training run reproduces the trainer's eval, and
predict / the predict CLI handle image and video files (tiny models, synthetic data)."""

import json
import os
import pathlib
import subprocess
import sys

import av
import jax
import numpy as np
import pytest
from PIL import Image

from structvit_jax import checkpoint, device_input, export, inference, train, train_state
from structvit_jax.data import registry, synthetic, video
from structvit_jax.models import get_model

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_train import tiny_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
           XLA_FLAGS="--xla_force_host_platform_device_count=1")


FAST_COMPILES = True  # XLA's cheap compile mode for this module (conftest.py)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """3 steps of structvit_tiny (BatchNorm + EMA) on one device, exported by the CLI."""
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config(num_train_steps=3)
  state, ev = train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  out = tmp_path_factory.mktemp("export") / "model"
  r = subprocess.run([sys.executable, "-m", "structvit_jax.export", f"--workdir={workdir}",
                      f"--out={out}"], env=ENV, cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "EMA" in r.stdout
  return config, workdir, jax.device_get(state), ev, out, inference.load(str(out))


def test_export_metadata(run):
  config, _, state, _, out, pred = run
  meta = json.loads((out / "model.json").read_text())
  assert meta["format"] == inference.FORMAT and meta["model"] == "structvit_tiny"
  assert meta["kwargs"]["num_classes"] == 10 and meta["kwargs"]["dtype"] == "float32"
  assert meta["input"] == dict(kind="image", image_size=32, num_frames=0,
                               mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                               crop_ratio=1.0)
  assert meta["class_names"] == list(synthetic.IMAGE_CLASSES) == pred.class_names
  assert meta["source"].endswith("@3 (EMA)")
  # EMA picked (ema_decay > 0): the exported params are the EMA, and BN stats came along.
  jax.tree.map(np.testing.assert_array_equal, pred.variables["params"], state.ema_params)
  jax.tree.map(np.testing.assert_array_equal, pred.variables["batch_stats"],
               state.batch_stats)


def test_export_serving_files_and_model_card(run):
  """The CLI export also writes model.stablehlo (its logits: test_serving_export.py) and a
  model card naming the run, the step, the weights and the run's last eval top-1."""
  config, workdir, _, ev, out, pred = run
  meta = json.loads((out / "model.json").read_text())
  assert meta["serving"]["stablehlo"]["platforms"] == ["cpu", "cuda", "tpu"]
  assert (out / "model.stablehlo").stat().st_size == meta["serving"]["stablehlo"]["bytes"]
  assert not (out / "model.onnx").exists()  # --onnx only
  card = (out / "README.md").read_text()
  for text in (f"training run: `{workdir}`, dataset synthetic_image, 3 steps planned",
               "exported: step 3, EMA weights",
               f"eval_ema/top1 at step 3): {ev['eval_ema/top1']:.4f}",
               "StructSA D=2 S=1", "model.stablehlo"):
    assert text in card, text
  # predict's StableHLO backend on the uint8 images the Flax backend normalises.
  hlo = inference.load(str(out), backend="stablehlo")
  src = synthetic.SyntheticImageSource("validation", 3, 32)
  images = [src[i]["image"] for i in range(3)]
  np.testing.assert_allclose(hlo.predict(images), pred.predict(images), rtol=1e-5, atol=1e-6)


def test_logits_and_eval_top1_match_trainer(run):
  config, _, state, ev, _, pred = run
  model = train_state.build_model(config, 10)
  variables = {"params": state.ema_params, "batch_stats": state.batch_stats}
  inp = train.create_input(config, "eval", 16, config.seed)
  correct = count = 0.0
  for i, batch in enumerate(inp.make_eval_iterator()):
    # The trainer's batches are uint8, normalised in its jitted step; an export takes the
    # normalised float images (the host pipeline's).
    assert batch["image"].dtype == np.uint8
    image = np.asarray(device_input.images(batch, inp.normalization))
    got = pred.logits(image)
    if i == 0:
      # jitted as in the trainer (eager apply on numpy params trips the depthwise loop)
      apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
      want = np.asarray(apply(variables, image))
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    mask = batch["mask"].astype(np.float64)
    correct += float(((got.argmax(-1) == batch["label"]) * mask).sum())
    count += mask.sum()
  assert count == ev["eval_ema/count"] == 40
  assert correct / count == ev["eval_ema/top1"]


def test_no_ema_and_step(run, tmp_path):
  _, workdir, state, _, _, _ = run
  summary = export.export(str(workdir), str(tmp_path / "raw"), step=3, use_ema=False)
  assert "raw params" in summary
  raw = checkpoint.restore_arrays(str(tmp_path / "raw" / "params"))
  jax.tree.map(np.testing.assert_array_equal, raw["params"], state.params)
  with pytest.raises(export.ExportError, match=r"no checkpoint of step 7 .*steps: \[3\]"):
    export.export(str(workdir), str(tmp_path / "x"), step=7)


def test_export_errors(tmp_path):
  with pytest.raises(export.ExportError, match="config.json not found.*structvit_jax.main"):
    export.export(str(tmp_path), str(tmp_path / "out"))
  (tmp_path / "config.json").write_text(tiny_config().to_json_best_effort())
  with pytest.raises(export.ExportError, match="no checkpoint in"):
    export.export(str(tmp_path), str(tmp_path / "out"))


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
  """5 eval-split synthetic images as PNG (lossless) and JPEG, plus a corrupt JPEG."""
  d = tmp_path_factory.mktemp("images")
  src = synthetic.SyntheticImageSource("validation", 5, 32)
  arrays = [src[i]["image"] for i in range(5)]
  pngs, jpgs = [], []
  for i, a in enumerate(arrays):
    pngs.append(str(d / f"{i}.png"))
    jpgs.append(str(d / f"{i}.jpg"))
    Image.fromarray(a).save(pngs[-1])
    Image.fromarray(a).save(jpgs[-1], quality=90)
  bad = d / "corrupt.jpg"
  bad.write_bytes(pathlib.Path(jpgs[0]).read_bytes()[:100])  # truncated
  return arrays, pngs, jpgs, str(bad)


def test_predict_images(run, image_files):
  *_, pred = run
  arrays, pngs, jpgs, bad = image_files
  # The eval preprocessing of synthetic images is normalisation only (crop ratio 1).
  norm = (np.stack(arrays).astype(np.float32) / 255 - np.float32([0.485, 0.456, 0.406])) \
      / np.float32([0.229, 0.224, 0.225])
  want = np.asarray(jax.nn.softmax(pred.logits_batched(norm)))  # padded to 8 as predict
  np.testing.assert_allclose(pred.predict(arrays), want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(pred.predict(pngs), want, rtol=1e-4, atol=1e-6)
  probs = pred.predict(jpgs + [arrays[0]])
  assert probs.shape == (6, 10)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  top = pred.top_k(pngs, k=5)
  assert len(top) == 5 and all(len(t) == 5 for t in top)
  assert [t[0][0] for t in top] == [synthetic.IMAGE_CLASSES[i] for i in want.argmax(-1)]
  assert [p for _, p in top[0]] == sorted((p for _, p in top[0]), reverse=True)
  np.testing.assert_allclose([p for _, p in top[0]], np.sort(want[0])[::-1][:5], rtol=1e-4)
  with pytest.raises(inference.InputError, match="cannot read image .*corrupt.jpg"):
    pred.predict([bad])


def test_predict_cli(run, image_files, tmp_path):
  *_, out, pred = run
  _, pngs, jpgs, bad = image_files
  missing = str(tmp_path / "missing.png")
  r = subprocess.run([sys.executable, "-m", "structvit_jax.predict", f"--model={out}",
                      pngs[0], bad, missing, jpgs[1]], env=ENV, cwd=REPO,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  lines = r.stdout.splitlines()
  assert lines[0] == pngs[0] and lines[6] == jpgs[1] and len(lines) == 12
  names = [line.split(None, 1)[1] for line in lines[1:6]]
  assert names == [c for c, _ in pred.top_k(pngs[0])[0]]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 2
  assert "corrupt.jpg" in errors[0] and "cannot read image" in errors[0]
  assert "missing.png: no such file" in errors[1]


def write_index_video(path: str, num_frames: int = 8, size: int = 32) -> None:
  """Lossless libx264: frame i is flat grey 20*i (so the sampled frames can be read back)."""
  with av.open(path, "w") as c:
    s = c.add_stream("libx264", rate=25)
    s.width = s.height = size
    s.pix_fmt, s.options = "yuv420p", {"crf": "0"}
    for i in range(num_frames):
      frame = np.full((size, size, 3), 20 * i, np.uint8)
      for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def test_video_export_predicts_mp4(tmp_path):
  model = get_model("timesformer_tiny", num_frames=4, num_classes=8)
  x = np.zeros((1, 4, 32, 32, 3), np.float32)
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  spec = dict(kind="video", image_size=32, num_frames=4, mean=[0.45] * 3, std=[0.225] * 3,
              sampling="dense", sampling_rate=2)
  out = str(tmp_path / "video_model")
  inference.save_export(out, "timesformer_tiny", dict(num_frames=4, num_classes=8), variables,
                        spec, synthetic.MOTIONS, source="test")
  pred = inference.load(out)
  assert "batch_stats" not in pred.variables  # no BatchNorm: {} stored, none given back
  want = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  np.testing.assert_allclose(pred.logits(x), want, rtol=1e-5, atol=1e-6)
  path = str(tmp_path / "clip.mp4")
  write_index_video(path)
  clip = pred.preprocess_one(path)
  assert clip.shape == (4, 32, 32, 3)
  # Dense test sampling, 4 frames 2 apart, centred in 8: frames 0, 2, 4, 6.
  grey = np.round((clip.reshape(4, -1).mean(1) * 0.225 + 0.45) * 255 / 20).astype(int)
  np.testing.assert_array_equal(grey, [0, 2, 4, 6])
  with video.VideoReader(path) as reader:
    frames = reader.read(np.arange(reader.num_frames), 32)
  probs = pred.predict([path])
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(probs, pred.predict(frames), rtol=1e-5, atol=1e-7)
  assert pred.top_k(path, k=3)[0][0][0] in synthetic.MOTIONS


def test_input_spec_of_video_configs():
  from structvit_jax.data.preprocessing import eval_spec
  k400 = tiny_config(**{"data.name": "kinetics400", "data.num_frames": 8, "data.image_size": 224})
  k400.data.sampling, k400.data.sampling_rate = "dense", 8
  assert eval_spec(k400.data) == dict(
      kind="video", image_size=224, num_frames=8, mean=[0.45] * 3, std=[0.225] * 3,
      sampling="dense", sampling_rate=8)
  assert registry.class_names(k400.data) is None
  syn = tiny_config(**{"data.name": "synthetic_video", "data.num_frames": 4})
  assert eval_spec(syn.data)["sampling_rate"] == 1
  assert registry.class_names(syn.data) == list(synthetic.MOTIONS)
