"""Something-Something V1 on a generated frame-folder dataset (`<id>/00001.jpg ...` and the
three official `;`-separated CSVs): the list conversion (TSM's sorted label order, missing
folders, one-line errors), the frame-folder reader (frames in order, a missing frame and a
corrupt JPEG counted as bad videos), the segment sampling through the shared video
pipeline, and the SSv1 recipes end to end with a tiny model."""

import logging
import os
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from structvit_jax import cli, config_utils, export, train
from structvit_jax.data import create_input, registry, video, video_lists

REPO = pathlib.Path(__file__).resolve().parents[1]
FAST_COMPILES = True  # XLA's cheap compile mode: the end-to-end recipes' compiles (conftest.py)
LEVEL = 12            # frame i is flat grey i * LEVEL: its index survives JPEG
FRAMES = video_lists.SSV1_FRAMES
# Official label file order (not sorted): the label of a name is its position once sorted.
LABELS = ["Pushing something from left to right", "Holding something",
          "Moving something up"]
SORTED = sorted(LABELS)                       # Holding 0, Moving 1, Pushing 2
# id -> (frames, label name); 7 lacks 00005.jpg, 8's 00003.jpg is a truncated JPEG (with 3
# frames and 4 segments, frame index 2 is in every draw), 999 has no folder.
TRAIN = {"11": (20, LABELS[0]), "12": (13, LABELS[1]), "13": (20, LABELS[2]),
         "14": (16, LABELS[0]), "15": (20, LABELS[1]), "16": (9, LABELS[2]),
         "7": (12, LABELS[0]), "8": (3, LABELS[1]), "999": (0, LABELS[2])}
VAL = {"21": (20, LABELS[1]), "22": (13, LABELS[0]), "7": (12, LABELS[0]),
       "8": (3, LABELS[1])}


def load(name, arg=None):
  return config_utils.import_sibling(str(REPO / "configs" / "x.py"), name).get_config(arg)


def frame_index(clip):
  """Per-frame index of an index-coded clip (uint8, or normalised with 0.45/0.225)."""
  x = np.asarray(clip)
  if x.dtype != np.uint8:
    x = (x * 0.225 + 0.45) * 255.0
  return np.round(x.reshape(x.shape[0], -1).mean(1) / LEVEL).astype(int)


def write_frames(folder, n, height=40, width=56):
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    Image.fromarray(np.full((height, width, 3), i * LEVEL, np.uint8)).save(
        folder / f"{i + 1:05d}.jpg", quality=95)


@pytest.fixture(scope="module")
def ssv1(tmp_path_factory):
  """(annotation dir with the three CSVs, DATA_DIR with the frame folders)."""
  ann, data = tmp_path_factory.mktemp("ann"), tmp_path_factory.mktemp("ssv1")
  (ann / video_lists.SSV1_LABELS).write_text("".join(n + "\n" for n in LABELS))
  for name, split in (("train", TRAIN), ("validation", VAL)):
    (ann / f"something-something-v1-{name}.csv").write_text(
        "".join(f"{i};{label}\n" for i, (_, label) in split.items()))
  for i, (n, _) in {**TRAIN, **VAL}.items():
    if n:
      write_frames(data / FRAMES / i, n)
  (data / FRAMES / "7" / "00005.jpg").unlink()                  # a missing frame
  bad = data / FRAMES / "8" / "00003.jpg"
  bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])  # a truncated JPEG
  video_lists.convert("ssv1", str(data), {
      "train.csv": str(ann / "something-something-v1-train.csv"),
      "val.csv": str(ann / "something-something-v1-validation.csv")})
  return ann, data


def ssv1_config(data_dir, name="ssv1_s", arg=None, frames=4, size=32, **data):
  c = load(name, arg)
  c.data.data_dir = str(data_dir)
  c.data.num_frames, c.data.image_size, c.data.num_workers = frames, size, 0
  c.data.scale_jitter = (size, size + 8)
  for k, v in data.items():
    c.data[k] = v
  return c


# ----------------------------------------------------------------------------- lists


def test_conversion_labels_in_tsm_order_and_missing_folders(ssv1, tmp_path):
  ann, data = ssv1
  label = {n: SORTED.index(n) for n in LABELS}
  assert (data / "train.csv").read_text() == "".join(
      f"{FRAMES}/{i} {label[name]}\n" for i, (n, name) in TRAIN.items() if n)
  assert (data / "val.csv").read_text() == "".join(
      f"{FRAMES}/{i} {label[name]}\n" for i, (_, name) in VAL.items())
  assert (data / "train.csv.missing.txt").read_text() == "999\n"
  assert (data / "classes.txt").read_text().splitlines() == SORTED
  assert registry.class_names(ssv1_config(data).data) == SORTED
  # the folder holding the <id>/ folders given explicitly; --classes sets the order
  cats = tmp_path / "category.txt"
  cats.write_text("".join(n + "\n" for n in LABELS))
  written = video_lists.convert("ssv1", str(tmp_path), {
      "t.csv": str(ann / "something-something-v1-validation.csv")}, videos=str(data / FRAMES),
      classes=str(cats))
  rel = os.path.relpath(data / FRAMES, tmp_path)
  assert (tmp_path / "t.csv").read_text().splitlines()[:2] == [f"{rel}/21 1", f"{rel}/22 0"]
  assert video_lists.summary(written) == f"{tmp_path / 't.csv'}: 4 of 4 videos"
  assert (tmp_path / "classes.txt").read_text().splitlines() == LABELS


@pytest.mark.parametrize("line,match", [
    ("11", r"t\.csv:2: expected 'id;label name' .* got '11'; no label: the test set\?"),
    ("11;", r"t\.csv:2: expected 'id;label name' \(the SSv1 list format\), got '11;'$"),
    (";Holding something", r"t\.csv:2: '' is not a video id"),
    ("11;Holding nothing", r"t\.csv:2: label 'Holding nothing' is not among the 3 class names"),
])
def test_malformed_lines_are_one_line_errors(ssv1, tmp_path, line, match):
  ann, data = ssv1
  bad = tmp_path / "t.csv"
  bad.write_text(f"12;Holding something\n{line}\n")
  with pytest.raises(cli.UserError, match=match) as e:
    video_lists.convert("ssv1", str(data), {"x.csv": str(bad)},
                        labels=str(ann / video_lists.SSV1_LABELS))
  assert "\n" not in str(e.value)


def test_labels_and_folder_errors(ssv1, tmp_path):
  ann, data = ssv1
  train = str(ann / "something-something-v1-train.csv")
  lonely = tmp_path / "lonely.csv"
  lonely.write_text("11;Holding something\n")
  with pytest.raises(cli.UserError, match=r"something-something-v1-labels\.csv not found: "
                                             r"pass --labels="):
    video_lists.convert("ssv1", str(data), {"x.csv": str(lonely)})
  swapped = tmp_path / "swapped.csv"
  swapped.write_text("11;Holding something\n")
  with pytest.raises(cli.UserError, match=r"swapped\.csv: expected one label name a line"):
    video_lists.convert("ssv1", str(data), {"x.csv": train}, labels=str(swapped))
  with pytest.raises(cli.UserError, match=r"none of the 9 videos of .*train\.csv found as "
                                             r"frame folders under .*elsewhere \(looked for "
                                             r"folders such as 11/\)"):
    video_lists.convert("ssv1", str(data), {"x.csv": train}, videos="elsewhere")


# ----------------------------------------------------------------------------- reader


def test_reader_returns_the_frames_in_order(ssv1):
  _, data = ssv1
  with video.open_video(str(data / FRAMES / "11")) as r:
    assert isinstance(r, video.FrameFolderReader) and r.num_frames == 20
    idx = np.array([3, 3, 0, 19, 17, 8])                  # any order, repeats
    frames = r.read(idx, 32)
    assert frames.shape == (6, 32, 44, 3) and frames.dtype == np.uint8  # 40x56 -> short 32
    np.testing.assert_array_equal(frame_index(frames), idx)
    np.testing.assert_array_equal(frame_index(r.read(np.arange(20), 40)), np.arange(20))
  with pytest.raises(video.BadVideoError, match=r"1 missing frame\(s\) in .*7 \(numbers 5 "
                                                r"of 1\.\.12\)"):
    video.open_video(str(data / FRAMES / "7"))
  with video.open_video(str(data / FRAMES / "8")) as r:
    np.testing.assert_array_equal(frame_index(r.read(np.array([0, 1]), 40)), [0, 1])
    with pytest.raises(video.BadVideoError, match=r"cannot decode frame .*00003\.jpg"):
      r.read(np.array([0, 2]), 40)
  with pytest.raises(OSError):                             # no folder: as a missing file
    video.open_video(str(data / FRAMES / "999"))


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_samples_segments_and_counts_bad_videos(ssv1, caplog):
  _, data = ssv1
  c = ssv1_config(data, randaugment="", random_erase=0.0)  # pixels must keep the index
  assert (c.data.sampling, c.data.random_flip, c.data.test_clips, c.data.test_crops) == (
      "segment", False, 1, 3)
  caplog.set_level(logging.WARNING)
  # eval: the documented segment frames of every view; 7 and 8 masked out and counted
  b = next(create_input(c, "eval", 12).make_eval_iterator())
  assert [int(v) for v in b["video_id"]] == [v for v in range(4) for _ in range(3)]
  np.testing.assert_array_equal(b["mask"], [True] * 6 + [False] * 6)
  np.testing.assert_array_equal(b["bad"], [0] * 6 + [1] * 6)
  for img, v in zip(b["image"][:6], b["video_id"][:6]):
    np.testing.assert_array_equal(frame_index(img),
                                  video.segment_indices(VAL[["21", "22"][v]][0], 4))
  # train: 8 listed videos, 2 bad ones replaced (each epoch: 2 counted); logged once each
  it = create_input(c, "train", 4, seed=0).iterator
  batches = [next(it) for _ in range(6)]                  # 3 epochs
  bad = np.concatenate([x["bad"] for x in batches])
  assert bad.sum() == 6
  for x in batches:
    assert x["image"].shape == (4, 4, 32, 32, 3)
    for img in x["image"]:
      assert (np.diff(frame_index(img)) >= 0).all()      # segments in order
  for name in (os.path.join(FRAMES, "7"), os.path.join(FRAMES, "8")):
    assert sum(name in r.getMessage() for r in caplog.records) == 1, name


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name,frames,drop_path", [("ssv1_s", 16, 0.3), ("ssv1_b", 32, 0.4)])
def test_structvit_recipes_are_the_ssv2_ones_on_ssv1(name, frames, drop_path):
  c, v2 = load(name), load(name.replace("ssv1", "ssv2"))
  assert (c.data.name, c.model.kwargs.num_classes, c.data.num_frames) == ("ssv1", 174, frames)
  assert (c.data.sampling, c.data.random_flip, c.num_epochs, c.warmup_epochs) == (
      "segment", False, 60.0, 5.0)
  assert c.model.kwargs.drop_path_rate == drop_path and c.init_from.drop_head
  c.data.name = "ssv2"
  assert c.to_dict() == v2.to_dict()


def test_deit_ablation_video_mode_builds_the_paper_model():
  from ml_collections.config_flags import config_flags
  from structvit_jax.models import get_model
  c = config_flags.ConfigFileFlagParser("config").parse(
      str(REPO / "configs" / "deit_s_ablation.py:video=True,d=4,m=3,aggregation=element"))
  ssa = c.model.kwargs.structsa
  assert (ssa.d, ssa.kernel_size, ssa.aggregation) == (4, 3, "element")
  model = get_model(c.model.name, **c.model.kwargs)
  x = jax.ShapeDtypeStruct((1, 16, 224, 224, 3), np.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)["params"]
  assert params["patch_embed"]["kernel"].shape == (1, 16, 16, 3, 384)
  assert params["time_embed"].shape == (1, 16, 384) and params["head"]["kernel"].shape[-1] == 174
  assert params["blocks_0"]["attn"]["u_k"].shape[:3] == (3, 3, 3)
  assert load("deit_s_ablation", "video=True,tubelet=2").model.kwargs.temporal_patch_size == 2
  with pytest.raises(ValueError, match="frames=16 must be a positive multiple of tubelet=3"):
    load("deit_s_ablation", "video=True,tubelet=3")
  with pytest.raises(ValueError, match="need video=True"):
    load("deit_s_ablation", "frames=8")


# ----------------------------------------------------------------------------- end to end


def _tiny_run(c):
  c.data.num_classes = 3
  c.batch_size = c.eval_batch_size = 4
  c.lr_base_batch_size = 4
  c.num_train_steps = 2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 100
  c.eval_every_epochs = 100.0
  c.remat = False
  return c


def _check_results(state, results):
  assert int(state.step) == 2
  assert (results["eval/count"], results["eval/views"]) == (2, 6)  # 7 and 8 left out
  assert results["eval/bad_examples"] == 6
  assert np.isfinite(results["eval/loss"]) and 0 <= results["eval/top1"] <= 1


def test_structvit_recipe_trains_and_evaluates_end_to_end(tmp_path, ssv1):
  _, data = ssv1
  c = _tiny_run(ssv1_config(data, "ssv1_s"))
  c.model.name = "structvit_tiny"
  c.model.kwargs.drop_path_rate = 0.1
  _check_results(*train.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1]))


def test_deit_ablation_video_recipe_fine_tunes_an_image_deit(tmp_path, ssv1):
  """Table 1's SSv1 run at toy size: deit_tiny with StructSA (D=4, 3x3x3) on 4-frame clips,
  initialised from an image deit_tiny export of another class count (inflated patch kernel,
  same position table, new head), random crop only."""
  from structvit_jax import inference
  from structvit_jax.data.preprocessing import default_spec
  from structvit_jax.models import get_model
  _, data = ssv1
  c = ssv1_config(data, "deit_s_ablation", "video=True,d=4,m=3")
  assert (c.data.name, c.model.name, c.model.kwargs.temporal_patch_size) == (
      "ssv1", "deit_s", 1)
  assert (c.data.sampling, c.data.num_frames, tuple(load("deit_s_ablation", "video=True")
                                                     .data.scale_jitter)) == (
      "segment", 4, (256, 256))
  assert not (c.data.random_flip or c.data.randaugment or c.data.random_erase
              or c.mixup_alpha or c.cutmix_alpha)
  assert (c.init_from.inflate, c.init_from.drop_head) == ("average", True)
  kw = dict(num_classes=10, structsa=c.model.kwargs.structsa.to_dict())
  image_model = get_model("deit_tiny", **kw)
  image = jax.jit(image_model.init)(jax.random.PRNGKey(3), np.zeros((1, 32, 32, 3)))
  inference.save_export(str(tmp_path / "in1k"), "deit_tiny", kw, image,
                        default_spec("image", 32))
  c = _tiny_run(c)
  c.model.name = "deit_tiny"
  c.init_from.checkpoint = str(tmp_path / "in1k")
  state, results = train.train_and_evaluate(c, str(tmp_path / "run"), devices=jax.devices()[:1])
  _check_results(state, results)
  # Two AdamW steps move each weight by ~lr (a few 1e-4), far less than the spread of a fresh
  # init (0.02): the weights are still the image model's.
  got, src = state.params, image["params"]
  assert got["patch_embed"]["kernel"].shape == (1, *src["patch_embed"]["kernel"].shape)
  np.testing.assert_allclose(got["patch_embed"]["kernel"][0], src["patch_embed"]["kernel"],
                             atol=2e-3)
  np.testing.assert_allclose(got["pos_embed"], src["pos_embed"], atol=2e-3)
  np.testing.assert_allclose(got["blocks_1"]["attn"]["qkv"]["kernel"],
                             src["blocks_1"]["attn"]["qkv"]["kernel"], atol=2e-3)
  assert got["blocks_1"]["attn"]["u_k"].shape == (3, 3, 3, 4, 64)  # the 3x3x3 window
  assert got["head"]["kernel"].shape[-1] == 3 and got["time_embed"].shape == (1, 4, 64)
  # exported with the dataset's class names; predict reads a frame folder as the eval does
  export.export(str(tmp_path / "run"), str(tmp_path / "export"))
  pred = inference.load(str(tmp_path / "export"))
  assert pred.class_names == SORTED
  folder = str(data / FRAMES / "21")
  assert pred.read_views(folder).shape == (3, 4, 32, 32, 3)  # 1 clip x 3 crops
  np.testing.assert_array_equal(frame_index(pred.read(folder)), video.segment_indices(20, 4))
  assert pred.predict(folder).shape == (1, 3)
  with pytest.raises(inference.InputError, match=r"cannot read video .*/7: BadVideoError: 1 "
                                                 r"missing frame"):
    pred.predict(str(data / FRAMES / "7"))
