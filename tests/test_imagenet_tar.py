"""prepare --dataset=imagenet2012 from the official ILSVRC2012_img_train.tar (a tar of
per-class tars) and ILSVRC2012_img_val.tar, read in place: the same ArrayRecord data as the
extracted directory; clear errors for a foreign, truncated or corrupt tar."""

import io
import os
import tarfile

import numpy as np
from PIL import Image
import pytest

from structvit_jax import cli
from structvit_jax.data import builders, prepare

NAMES = builders.imagenet_label_names()
CLASSES = (NAMES[3], NAMES[7], NAMES[500])


def _jpeg(rng) -> bytes:
  buf = io.BytesIO()
  h, w = rng.integers(20, 40, 2)
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  """The same images twice: tars/ (the two official tars) and tree/ (extracted)."""
  rng = np.random.default_rng(0)
  root = tmp_path_factory.mktemp("imagenet")
  tars, tree = root / "tars", root / "tree"
  tars.mkdir()
  with tarfile.open(tars / prepare.TRAIN_TAR, "w") as outer:
    for k, cls in enumerate(CLASSES):
      (tree / "train" / cls).mkdir(parents=True)
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode="w") as inner:
        for i in range(2 + k):
          data = _jpeg(rng)
          if (k, i) == (1, 0):
            data = data[:len(data) // 2]  # truncated: skipped on both routes
          _add(inner, f"{cls}_{i}.JPEG", data)
          (tree / "train" / cls / f"{cls}_{i}.JPEG").write_bytes(data)
      _add(outer, f"{cls}.tar", buf.getvalue())
  (tree / "val").mkdir()
  with tarfile.open(tars / prepare.VAL_TAR, "w") as val:
    for i in (1, 2, 3):
      data = _jpeg(rng)
      _add(val, f"ILSVRC2012_val_0000000{i}.JPEG", data)
      (tree / "val" / f"ILSVRC2012_val_0000000{i}.JPEG").write_bytes(data)
  solution = ("ImageId,PredictionString\n" + "".join(
      f"ILSVRC2012_val_0000000{i},{CLASSES[i - 1]} 1 2 3 4\n" for i in (1, 2, 3)))
  for d in (tars, tree):
    (d / "LOC_val_solution.csv").write_text(solution)
  return tars, tree


def _records(directory: str, split: str) -> list[tuple]:
  src, _, _ = builders.open_split(builders.find_prepared(directory, "imagenet2012"), split)
  return sorted((r["file_name"], int(r["label"]), r["image"]) for r in (src[i] for i in
                                                                         range(len(src))))


def test_outer_tar_prepares_as_the_extracted_tree(raw, tmp_path):
  tars, tree = raw
  a = prepare.prepare("imagenet2012", str(tars), str(tmp_path / "a"), workers=2)
  b = prepare.prepare("imagenet2012", str(tree), str(tmp_path / "b"), workers=1)
  assert a.num_examples == b.num_examples == {"train": 2 + 3 + 4 - 1, "validation": 3}
  bad = f"{CLASSES[1]}_0.JPEG"
  assert a.skipped["train"] == [f"{tars / prepare.TRAIN_TAR}[{CLASSES[1]}.tar/{bad}]"]
  assert b.skipped["train"] == [str(tree / "train" / CLASSES[1] / bad)]
  for split in ("train", "validation"):
    got = _records(str(tmp_path / "a"), split)
    assert got == _records(str(tmp_path / "b"), split) and got
  train = _records(str(tmp_path / "a"), "train")
  assert [(f, l) for f, l, _ in train][:2] == [(f"{CLASSES[0]}/{CLASSES[0]}_0.JPEG".encode(), 3),
                                               (f"{CLASSES[0]}/{CLASSES[0]}_1.JPEG".encode(), 3)]
  # The tar alone as --src: the train split only, the same records.
  c = prepare.prepare("imagenet2012", str(tars / prepare.TRAIN_TAR), str(tmp_path / "c"))
  assert c.num_examples == {"train": 8}
  assert _records(str(tmp_path / "c"), "train") == train


def test_foreign_truncated_or_corrupt_tars_are_clear_errors(raw, tmp_path):
  tars, _ = raw
  with pytest.raises(cli.UserError, match=r"image files directly \(is it "
                     r"ILSVRC2012_img_val.tar\?"):
    prepare.discover_imagenet(str(tars / prepare.VAL_TAR))
  not_tar = tmp_path / "x.tar"
  not_tar.write_bytes(b"<html>404 not found</html>" * 40)
  with pytest.raises(cli.UserError, match="not a readable tar file.*expected the official "
                     "ILSVRC2012_img_train.tar"):
    prepare.discover_imagenet(str(not_tar))
  data = (tars / prepare.TRAIN_TAR).read_bytes()
  cut = tmp_path / "cut.tar"
  cut.write_bytes(data[:len(data) * 2 // 3])
  with pytest.raises(cli.UserError, match="truncated or corrupt.*download "
                     "ILSVRC2012_img_train.tar again"):
    prepare.discover_imagenet(str(cut))
  # An inner tar whose header is garbage.
  with tarfile.open(tmp_path / "bad_inner.tar", "w") as outer:
    _add(outer, f"{CLASSES[0]}.tar", b"\x01garbage" * 200)
  with pytest.raises(cli.UserError, match=f"member {CLASSES[0]}.tar is not a readable tar"):
    prepare.discover_imagenet(str(tmp_path / "bad_inner.tar"))
