"""video_lists: our list files from the official SSv2 JSON and Kinetics-400 CSV annotations
(labels by SlowFast's ssv2 template rule / sorted or given Kinetics class order; videos found
by name under DATA_DIR; missing videos counted and named; clear errors)."""

import json
import os
import subprocess
import sys

import pytest

from structvit_jax import cli
from structvit_jax.data import video, video_lists

REPO = os.path.join(os.path.dirname(__file__), "..")


def _touch(path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"")  # the converter only looks at names


@pytest.fixture
def ssv2(tmp_path):
  ann, data = tmp_path / "ann", tmp_path / "data"
  ann.mkdir()
  (ann / video_lists.SSV2_LABELS).write_text(json.dumps({
      "Approaching something with your camera": "1", "Holding something": "0",
      "Putting something on a surface": "2"}))
  (ann / "something-something-v2-train.json").write_text(json.dumps([
      {"id": "78687", "label": "approaching a cup with your camera",
       "template": "Approaching [something] with your camera", "placeholders": ["a cup"]},
      {"id": "5", "label": "putting pen on a surface",
       "template": "Putting [something] on a surface", "placeholders": ["pen"]},
      {"id": "6", "label": "holding keys", "template": "Holding [something]",
       "placeholders": ["keys"]}]))
  (ann / "something-something-v2-validation.json").write_text(json.dumps([
      {"id": "9", "label": "holding a ball", "template": "Holding [something]",
       "placeholders": ["a ball"]}]))
  for name in ("videos/78687.webm", "videos/6.webm", "videos/9.mp4", "videos/notes.txt"):
    _touch(data / name)
  return ann, data


def test_ssv2_lists_labels_by_template_and_reports_missing(ssv2):
  ann, data = ssv2
  written = video_lists.convert(
      "ssv2", str(data), {"train.csv": str(ann / "something-something-v2-train.json"),
                          "val.csv": str(ann / "something-something-v2-validation.json")})
  assert (data / "train.csv").read_text() == "videos/78687.webm 1\nvideos/6.webm 0\n"
  assert (data / "val.csv").read_text() == "videos/9.mp4 0\n"
  assert (data / "classes.txt").read_text().splitlines() == [
      "Holding something", "Approaching something with your camera",
      "Putting something on a surface"]
  assert [(w.total, w.written, w.missing) for w in written] == [(3, 2, ["5"]), (1, 1, [])]
  assert (data / "train.csv.missing.txt").read_text() == "5\n"
  assert not (data / "val.csv.missing.txt").exists()
  assert "2 of 3 videos; 1 not found (e.g. 5;" in video_lists.summary(written)
  # --classes: the order of a template list (UniFormer's category.txt form), no labels.json.
  cats = ann / "category.txt"
  cats.write_text("Putting [something] on a surface\nApproaching [something] with your camera\n"
                  "Holding [something]\n")
  video_lists.convert("ssv2", str(data), {"t.csv": str(ann / "something-something-v2-train.json")},
                      labels="/nonexistent", classes=str(cats))
  assert (data / "t.csv").read_text() == "videos/78687.webm 1\nvideos/6.webm 2\n"
  # The lists read as the pipeline reads them.
  assert video.read_list(str(data / "train.csv"), str(data), 174) == [
      (str(data / "videos/78687.webm"), 1), (str(data / "videos/6.webm"), 0)]


def test_ssv2_errors_are_clear(ssv2, tmp_path):
  ann, data = ssv2
  train = str(ann / "something-something-v2-train.json")
  test = ann / "something-something-v2-test.json"
  test.write_text(json.dumps([{"id": "1"}]))
  with pytest.raises(cli.UserError, match="no 'template'.*test set is unlabelled"):
    video_lists.convert("ssv2", str(data), {"train.csv": str(test)})
  other = tmp_path / "labels.json"
  other.write_text(json.dumps({"Holding something": "0"}))
  with pytest.raises(cli.UserError, match="2 template.*not among the classes, e.g. "
                     r"\['Approaching something with your camera'"):
    video_lists.convert("ssv2", str(data), {"train.csv": train}, labels=str(other))
  with pytest.raises(cli.UserError, match="labels.json not found: pass --labels"):
    video_lists.convert("ssv2", str(data), {"train.csv": train},
                        labels=str(tmp_path / "nope" / "labels.json"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(cli.UserError, match=r"none of the 3 videos of .*train.json found "
                     r"among the 0 video files .*names such as 78687.mp4"):
    video_lists.convert("ssv2", str(empty), {"train.csv": train})
  # The annotation under the list's own name in --data_dir is never overwritten.
  (data / "train.csv").write_text("x")
  with pytest.raises(cli.UserError, match="would be overwritten"):
    video_lists.convert("ssv2", str(data), {"train.csv": str(data / "train.csv")})
  assert (data / "train.csv").read_text() == "x"


K400_HEADER = "label,youtube_id,time_start,time_end,split,is_cc\n"


@pytest.fixture
def k400(tmp_path):
  ann, data = tmp_path / "ann", tmp_path / "data"
  ann.mkdir()
  (ann / "train.csv").write_text(
      K400_HEADER + "abseiling,-3B32lodo2M,59,69,train,0\n"
      "\"passing American football (in game)\",aa_bb,10,20,train,0\n"
      "air drumming,gone,0,10,train,0\n")
  (ann / "validate.csv").write_text(
      K400_HEADER + "air drumming,zz,5,15,val,0\nabseiling,yy,1,11,val,0\n")
  _touch(data / "train" / "abseiling" / "-3B32lodo2M_000059_000069.mp4")
  _touch(data / "train" / "passing American football (in game)" / "aa_bb_000010_000020.mp4")
  _touch(data / "val" / "zz.mkv")                     # named by the YouTube id alone
  _touch(data / "val" / "abseiling" / "yy_000001_000011.mp4")
  return ann, data


def test_kinetics_lists_sorted_or_given_class_order(k400):
  ann, data = k400
  anns = {"train.csv": str(ann / "train.csv"), "val.csv": str(ann / "validate.csv")}
  written = video_lists.convert("kinetics400", str(data), anns)
  assert (data / "train.csv").read_text() == (
      "train/abseiling/-3B32lodo2M_000059_000069.mp4 0\n"
      "train/passing American football (in game)/aa_bb_000010_000020.mp4 2\n")
  assert (data / "val.csv").read_text() == "val/zz.mkv 1\nval/abseiling/yy_000001_000011.mp4 0\n"
  assert [w.missing for w in written] == [["gone_000000_000010"], []]
  assert (data / "classes.txt").read_text().splitlines() == [
      "abseiling", "air drumming", "passing American football (in game)"]
  # Spaces in the path: the pipeline reads the label off the end.
  assert video.read_list(str(data / "train.csv"), str(data), 400)[1] == (
      str(data / "train/passing American football (in game)/aa_bb_000010_000020.mp4"), 2)
  # UniFormer's kinetics_400_categroies.txt form: 'name<TAB>index', in any order.
  cats = ann / "categories.txt"
  cats.write_text("air drumming\t2\npassing American football (in game)\t0\nabseiling\t1\n")
  video_lists.convert("kinetics400", str(data), anns, classes=str(cats))
  assert (data / "val.csv").read_text() == "val/zz.mkv 2\nval/abseiling/yy_000001_000011.mp4 1\n"
  assert (data / "classes.txt").read_text().splitlines() == [
      "passing American football (in game)", "abseiling", "air drumming"]
  # --videos: only that sub-directory is searched (paths stay relative to DATA_DIR).
  video_lists.convert("kinetics400", str(data), {"v.csv": anns["val.csv"]}, videos="val")
  assert (data / "v.csv").read_text() == "val/zz.mkv 1\nval/abseiling/yy_000001_000011.mp4 0\n"
  with pytest.raises(cli.UserError, match="none of the 3 videos of .*train.csv found among "
                     "the 2 video files under .*val"):
    video_lists.convert("kinetics400", str(data), {"t.csv": anns["train.csv"]}, videos="val")
  assert not (data / "t.csv").exists()


def test_kinetics_errors_are_clear(k400, tmp_path):
  ann, data = k400
  bad = tmp_path / "bad.csv"
  bad.write_text("youtube_id,label\nabc,abseiling\n")
  with pytest.raises(cli.UserError, match="expected the Kinetics CSV with the header"):
    video_lists.convert("kinetics400", str(data), {"train.csv": str(bad)})
  unlabelled = tmp_path / "test.csv"
  unlabelled.write_text(K400_HEADER + ",abc,0,10,test,0\n")
  with pytest.raises(cli.UserError, match="1 row.* without a label"):
    video_lists.convert("kinetics400", str(data), {"val.csv": str(unlabelled)})
  few = tmp_path / "few.txt"
  few.write_text("abseiling\n")
  with pytest.raises(cli.UserError, match="2 class.*not in the class list"):
    video_lists.convert("kinetics400", str(data), {"train.csv": str(ann / "train.csv")},
                        classes=str(few))


def test_cli_writes_the_lists(k400):
  from structvit_jax.data import prepare  # its flags and ours live in one process
  assert prepare.FLAGS is video_lists.FLAGS
  ann, data = k400
  out = subprocess.run(
      [sys.executable, "-m", "structvit_jax.data.video_lists", "--dataset=kinetics400",
       f"--data_dir={data}", f"--train={ann / 'train.csv'}", f"--val={ann / 'validate.csv'}"],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert out.returncode == 0, out.stderr
  assert f"{data / 'train.csv'}: 2 of 3 videos; 1 not found (e.g. gone_000000_000010;" in out.stdout
  assert "note: 3 classes in the given CSVs (Kinetics-400 has 400)" in out.stderr
  assert (data / "val.csv").read_text().count("\n") == 2
