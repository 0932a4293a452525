"""Image input path on a JPEG folder the test writes: prepare (TF-free tfds builder ->
ArrayRecord, resumable, unreadable files skipped) -> tfds data source -> grain -> batches;
DeiT transforms; corrupt records replaced and counted; per-process sharding; in1k_s end to
end with a tiny model."""

import hashlib
import io
import logging as pylogging
import os
import tarfile

import numpy as np
from PIL import Image
import pytest

from structvit_jax import config_utils
from structvit_jax.data import DatasetNotFoundError, builders, create_input, prepare
from structvit_jax.data import transforms as T

FAST_COMPILES = True  # XLA's cheap compile mode (conftest.py): the end-to-end run's compiles

REPO = os.path.join(os.path.dirname(__file__), "..")
in1k = config_utils.import_sibling(os.path.join(REPO, "configs", "in1k_s.py"), "in1k_s")
CLASSES = ("cat", "dog", "fox")
N_TRAIN, N_VAL = 8, 3  # per class


def _write_folder(root: str) -> str:
  """root/{train,validation}/<class>/*.jpg of varied sizes; train/cat/0.jpg truncated,
  one greyscale PNG (readable, stored re-encoded)."""
  rng = np.random.default_rng(0)
  for split, n in (("train", N_TRAIN), ("validation", N_VAL)):
    for c in CLASSES:
      os.makedirs(os.path.join(root, split, c))
      for i in range(n):
        h, w = rng.integers(36, 60, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(root, split, c, f"{i}.jpg"), quality=90)
  bad = os.path.join(root, "train", "cat", "0.jpg")
  data = open(bad, "rb").read()
  open(bad, "wb").write(data[: len(data) // 2])
  Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)).save(
      os.path.join(root, "validation", "dog", "grey.png"))
  return bad


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("raw"))
  return root, _write_folder(root)


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tfds"))
  summary = prepare.prepare("image_folder", folder[0], out, workers=1)
  return out, summary


@pytest.fixture(scope="module")
def unchecked(folder, tmp_path_factory):
  """Prepared WITHOUT the decode check: the truncated JPEG is in the ArrayRecord."""
  out = str(tmp_path_factory.mktemp("tfds_unchecked"))
  prepare.prepare("image_folder", folder[0], out, workers=1, verify=False)
  return out


def _config(data_dir, size=32, **data):
  c = in1k.get_config()
  c.data.name, c.data.data_dir, c.data.image_size, c.data.num_workers = (
      "image_folder", data_dir, size, 0)
  for k, v in data.items():
    c.data[k] = v
  return c


def _hashes(batch):
  return [hashlib.sha1(x.tobytes()).hexdigest() for x, m in zip(batch["image"], batch["mask"])
          if m]


def _eval_hashes(c, local_bs, pi=0, pc=1):
  inp = create_input(c, "eval", local_bs, pi, pc)
  out = []
  for b in inp.make_eval_iterator():
    out += _hashes(b)
  return out, inp


def test_prepare_writes_arrayrecord_and_reports_skipped(prepared, folder):
  out, s = prepared
  root, bad = folder
  assert s.num_examples == {"train": 3 * N_TRAIN - 1, "validation": 3 * N_VAL + 1}
  assert s.skipped == {"train": [bad], "validation": []}
  d = builders.find_prepared(out, "image_folder")
  assert d is not None and sorted(os.listdir(d)) == sorted(os.listdir(s.directory))
  assert any(f.startswith("image_folder-train.array_record") for f in os.listdir(d))
  assert not os.path.exists(os.path.join(out, "image_folder", ".prepare"))
  src, num_classes, fmt = builders.open_split(d, "validation")
  assert (len(src), num_classes, fmt) == (3 * N_VAL + 1, 3, "array_record")
  rec = {r["file_name"]: r for r in (src[i] for i in range(len(src)))}
  assert rec[b"dog/grey.png"]["image"][:2] == b"\xff\xd8"  # re-encoded as JPEG
  assert rec[b"fox/2.jpg"]["label"] == 2                      # sorted class names
  # Stored as is: the JPEG bytes equal the source file.
  assert rec[b"fox/2.jpg"]["image"] == open(os.path.join(root, "validation/fox/2.jpg"),
                                            "rb").read()
  # Rerun: nothing to do; the summary still lists what was skipped.
  again = prepare.prepare("image_folder", root, out)
  assert again.resumed == ["train", "validation"] and again.skipped == s.skipped


def test_prepare_imagenet_layouts(tmp_path):
  """train/ with class folders and per-class tars; val/ flat + LOC_val_solution.csv or
  val_labels.txt; labels in the official tfds order."""
  names = builders.imagenet_label_names()
  assert len(names) == 1000 and names == sorted(names)
  raw = tmp_path / "raw"

  def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (9, 99, 199)).save(buf, "JPEG")
    return buf.getvalue()

  (raw / "train" / names[3]).mkdir(parents=True)
  for i in range(2):
    (raw / "train" / names[3] / f"{names[3]}_{i}.JPEG").write_bytes(jpeg())
  with tarfile.open(raw / "train" / f"{names[7]}.tar", "w") as tar:
    for i in range(3):
      data = jpeg()
      info = tarfile.TarInfo(f"{names[7]}_{i}.JPEG")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  (raw / "val").mkdir()
  for i in (1, 2):
    (raw / "val" / f"ILSVRC2012_val_0000000{i}.JPEG").write_bytes(jpeg())
  (raw / "LOC_val_solution.csv").write_text(
      f"ImageId,PredictionString\nILSVRC2012_val_00000002,{names[7]} 1 2 3 4\n"
      f"ILSVRC2012_val_00000001,{names[3]} 5 6 7 8 {names[3]} 1 1 2 2\n")
  s = prepare.prepare("imagenet2012", str(raw), str(tmp_path / "out"))
  assert s.num_examples == {"train": 5, "validation": 2}
  assert s.directory.endswith(os.path.join("imagenet2012", "5.1.0"))
  found = builders.find_prepared(str(tmp_path / "out"), "imagenet2012")
  src, num_classes, _ = builders.open_split(found, "validation")
  assert num_classes == 1000 and str(found) == s.directory
  assert {r["file_name"]: r["label"] for r in (src[0], src[1])} == {
      b"ILSVRC2012_val_00000001.JPEG": 3, b"ILSVRC2012_val_00000002.JPEG": 7}
  train_src, _, _ = builders.open_split(found, "train")
  assert sorted(train_src[i]["label"] for i in range(5)) == [3, 3, 7, 7, 7]
  # The other validation label file: 'file_name label' (index or WordNet id).
  (raw / "LOC_val_solution.csv").unlink()
  (raw / "val_labels.txt").write_text(
      f"ILSVRC2012_val_00000001.JPEG 5\nILSVRC2012_val_00000002.JPEG {names[9]}\n")
  items, _ = prepare.discover_imagenet(str(raw))
  assert [(it.file_name, it.label) for it in items["validation"]] == [
      ("ILSVRC2012_val_00000001.JPEG", 5), ("ILSVRC2012_val_00000002.JPEG", 9)]


def test_prepare_resumes_after_an_interruption(folder, tmp_path, monkeypatch):
  root, bad = folder
  real = prepare._check_split

  def interrupted(items, workers, desc):
    if "validation" in desc:
      raise KeyboardInterrupt  # killed while checking the second split
    return real(items, workers, desc)

  monkeypatch.setattr(prepare, "_check_split", interrupted)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare("image_folder", root, str(tmp_path), name="my_folder")
  assert builders.find_prepared(str(tmp_path), "my_folder") is None
  calls = []
  monkeypatch.setattr(prepare, "_check_split",
                      lambda items, w, desc: calls.append(desc) or real(items, w, desc))
  s = prepare.prepare("image_folder", root, str(tmp_path), name="my_folder")
  assert calls == ["checking validation"]          # train was neither checked nor written
  assert s.resumed == ["train"] and s.skipped["train"] == [bad]
  c = _config(str(tmp_path), tfds_name="my_folder")
  assert create_input(c, "eval", 4).num_examples == 3 * N_VAL + 1


def test_train_and_eval_batches(prepared):
  c = _config(prepared[0])
  inp = create_input(c, "train", 8, seed=1)
  a = [next(inp.iterator) for _ in range(3)]
  b = next(create_input(c, "train", 8, seed=1).iterator)
  assert inp.num_classes == 3 and inp.input_shape == (32, 32, 3)
  x = a[0]
  assert x["image"].shape == (8, 32, 32, 3) and x["image"].dtype == np.float32
  assert x["label"].dtype == np.int32 and set(x["label"]) <= {0, 1, 2}
  assert x["bad"].dtype == np.int32 and not any(y["bad"].any() for y in a)
  np.testing.assert_array_equal(x["image"], b["image"])   # seeded, deterministic
  img = np.stack([y["image"] for y in a])
  # ImageNet-normalised uint8 lies in [-2.12, 2.64]; random erasing adds N(0, 1) noise.
  assert np.isfinite(img).all() and -6 < img.min() < -1.5 and 2 < img.max() < 6

  # Eval: resize + centre crop, normalised; every example exactly once (padded batches).
  got, ev = _eval_hashes(c, 4)
  assert ev.num_examples == 3 * N_VAL + 1 and ev.num_eval_batches == 3
  assert len(got) == len(set(got)) == ev.num_examples
  whole = next(create_input(c, "eval", 12).make_eval_iterator())
  assert sorted(_hashes(whole)) == sorted(got)
  assert -2.2 < whole["image"].min() and whole["image"].max() < 2.7


def test_two_processes_read_disjoint_shards_covering_the_split(prepared):
  c = _config(prepared[0])
  # Eval: disjoint, union = the split.
  h0, _ = _eval_hashes(c, 2, 0, 2)
  h1, _ = _eval_hashes(c, 2, 1, 2)
  assert not set(h0) & set(h1) and len(h0) + len(h1) == 3 * N_VAL + 1
  # Train: the two local batches of step t are the halves of the 1-process global batch
  # (same examples, same augmentation).
  one = create_input(c, "train", 8, seed=2).iterator
  p0 = create_input(c, "train", 4, 0, 2, seed=2).iterator
  p1 = create_input(c, "train", 4, 1, 2, seed=2).iterator
  for _ in range(3):  # one epoch of 23 examples = 2 full global batches + part of the next
    g, a, b = next(one), next(p0), next(p1)
    np.testing.assert_array_equal(g["image"], np.concatenate([a["image"], b["image"]]))
    np.testing.assert_array_equal(g["label"], np.concatenate([a["label"], b["label"]]))


def test_corrupt_record_is_logged_once_replaced_and_counted(unchecked, caplog):
  with pytest.raises(OSError):
    T.decode_jpeg(b"\xff\xd8\xff\xe0 not really a jpeg")
  c = _config(unchecked)
  c.data.eval_split = "train"  # the split that holds the truncated file
  with caplog.at_level(pylogging.WARNING):
    inp = create_input(c, "eval", 8)
    batches = [b for _ in range(2) for b in inp.make_eval_iterator()]
    tr = create_input(c, "train", 8, seed=0).iterator
    bad_train = sum(int(next(tr)["bad"].sum()) for _ in range(6))  # 2 epochs: goes on
  assert inp.num_examples == 3 * N_TRAIN  # nothing was skipped at prepare time
  # Once per pass; eval masks the stand-in out: the other examples count exactly once.
  assert sum(int((b["bad"]).sum()) for b in batches) == 2
  assert sum(int(b["mask"].sum()) for b in batches) == 2 * (3 * N_TRAIN - 1)
  assert bad_train == 2
  warnings = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
  assert len(warnings) == 1 and "cat/0.jpg" in warnings[0]


def test_deit_transforms():
  rng = np.random.default_rng(0)
  im = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
  el = {"image": im, "label": np.int32(0)}
  for name in T._RAND_INCREASING_TRANSFORMS + T._RAND_TRANSFORMS:
    for m in (0.0, 9.0, 10.0):
      out = T._apply_op(name, im, T._level(name, m, rng), (124, 116, 104))
      assert out.size == im.size and out.mode == "RGB", name
  ra = T.RandAugment("rand-m9-mstd0.5-inc1")
  assert (ra.m, ra.n, ra.std, ra.p, ra.ops) == (9, 2, 0.5, 0.5, T._RAND_INCREASING_TRANSFORMS)
  assert T.RandAugment("rand-m9-mstd0.5").ops == T._RAND_TRANSFORMS
  one = ra.random_map(el, np.random.default_rng(5))["image"]
  two = ra.random_map(el, np.random.default_rng(5))["image"]
  assert np.array_equal(np.asarray(one), np.asarray(two))
  crop = T.RandomResizedCrop(224).random_map(el, np.random.default_rng(1))["image"]
  assert crop.size == (224, 224)
  ev = T.ResizeCenterCrop(224).map(el)["image"]
  assert ev.size == (224, 224)  # shorter side 375 -> 256, centre 224
  for _ in range(200):  # crop boxes stay inside the image, area/aspect within the bounds
    x, y, w, h = T.random_resized_crop_box(rng, 500, 375, (0.08, 1.0), (3 / 4, 4 / 3))
    assert 0 <= x and x + w <= 500 and 0 <= y and y + h <= 375 and w * h >= 0.07 * 500 * 375
  z = {"image": np.zeros((32, 32, 3), np.float32)}
  erased = T.RandomErasing(1.0).random_map(z, np.random.default_rng(0))["image"]
  frac = (erased != 0).any(-1).mean()
  assert 0.015 < frac < 0.34 and not T.RandomErasing(0.0).random_map(
      z, np.random.default_rng(0))["image"].any()


def test_missing_data_is_one_clear_error(tmp_path):
  with pytest.raises(DatasetNotFoundError) as e:
    create_input(_config(str(tmp_path)), "train", 8)
  msg = str(e.value)
  assert str(tmp_path / "image_folder") in msg
  assert f"python -m structvit_jax.data.prepare --dataset=image_folder" in msg
  c = in1k.get_config()
  c.data.data_dir = str(tmp_path / "nope")
  with pytest.raises(DatasetNotFoundError, match="does not exist") as e:
    create_input(c, "train", 8)
  assert "--dataset=imagenet2012" in str(e.value)


def test_bench_reports_examples_per_second(prepared):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "benchmarks_input_pipeline", os.path.join(REPO, "benchmarks", "input_pipeline.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  r = bench.bench(_config(prepared[0]), steps=2, warmup=1, batch_size=4)
  assert r["examples"] == 8 and r["examples_per_sec"] > 0 and r["per_worker"] > 0


def test_in1k_s_trains_and_evaluates_end_to_end(unchecked, tmp_path, monkeypatch):
  from structvit_jax import run_log, train
  c = _config(unchecked)
  c.model.name = "structvit_tiny"
  c.model.kwargs.num_classes = 3
  c.batch_size = c.eval_batch_size = 8
  c.num_train_steps = 2
  c.log_every_steps = 1
  logged = {}
  real = run_log.MetricWriter.scalars
  monkeypatch.setattr(run_log.MetricWriter, "scalars",
                      lambda self, step, v: logged.update(v) or real(self, step, v))
  state, ev = train.train_and_evaluate(c, str(tmp_path))
  assert int(state.step) == 2 and ev["eval/count"] == 3 * N_VAL + 1
  assert np.isfinite(ev["eval/loss"])
  assert "train/bad_examples" in logged  # counted (0 or 1 here: where the shuffle put it)


def test_corrupt_record_with_workers_is_logged_once_over_eval_passes(unchecked, capfd,
                                                                     tmp_path, monkeypatch):
  from structvit_jax.data import ops
  monkeypatch.setenv(ops.BAD_MARKERS, str(tmp_path))  # a fresh trainer: nothing logged yet
  c = _config(unchecked, num_workers=1)
  c.data.eval_split = "train"  # the split that holds the truncated file
  inp = create_input(c, "eval", 8)
  for _ in range(2):  # every pass starts new worker processes
    bad = sum(int(b["bad"].sum()) for b in inp.make_eval_iterator())
    assert bad == 1
  err = capfd.readouterr().err
  assert err.count("unreadable image cat/0.jpg") == 1, err[-3000:]
