r"""List files (README.md, "Videos") from the official Something-Something V2 and
Kinetics-400 annotations:

  python -m structvit_jax.data.video_lists --dataset=ssv2 --data_dir=DATA_DIR \
      --train=something-something-v2-train.json --val=something-something-v2-validation.json
  python -m structvit_jax.data.video_lists --dataset=kinetics400 --data_dir=DATA_DIR \
      --train=kinetics400/train.csv --val=kinetics400/validate.csv [--classes=FILE]
  python -m structvit_jax.data.video_lists --dataset=ssv1 --data_dir=DATA_DIR \
      --train=something-something-v1-train.csv --val=something-something-v1-validation.csv

Writes DATA_DIR/train.csv and DATA_DIR/val.csv (`relative/path label` per line, the names
the video configs read) and DATA_DIR/classes.txt (the class names in label order, for
`convert --class_names`). Videos are found by name anywhere under DATA_DIR (or --videos),
with any video extension:
- SSv2: `<id>.webm` (any extension). Labels: SlowFast's ssv2 rule: the entry's `template`
  with its brackets removed, looked up in something-something-v2-labels.json (default: the
  one next to --train), or its position in --classes (brackets removed there too; e.g.
  UniFormer's data_list/sthv2/category.txt, the bracketed templates sorted, which orders a
  few classes differently).
- Kinetics-400 (`label,youtube_id,time_start,time_end,split[,is_cc]`):
  `<youtube_id>_<start:06d>_<end:06d>` (the ActivityNet crawler's name) or `<youtube_id>`.
  Labels: the sorted class names of the given CSVs (mmaction's order), or the order of
  --classes (one name a line, or `name<TAB>index` lines such as UniFormer's
  kinetics_400_categroies.txt, whose order its official K400 weights use).
- SSv1 (frame folders `<id>/00001.jpg ...`; `id;label name` lines): the folder `<id>` directly
  under --videos, default DATA_DIR/20bn-something-something-v1 if that exists, else DATA_DIR
  (folders are looked up by id, the frames are not listed here: the pipeline lists a
  folder when it reads it, so the list holds no frame counts). Labels: the position of the
  name among the sorted names of something-something-v1-labels.csv (default: the one next
  to --train), as TSM's tools/gen_label_sthv1.py writes category.txt and its lists, which
  UniFormer's SSv1 loader reads; or the order of --classes (e.g. that category.txt).
A listed video that is not found is left out of the list, counted, and named in
DATA_DIR/<list>.missing.txt (Kinetics always has some: YouTube removals); none found is an
error.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from typing import Sequence

from absl import flags

from structvit_jax import cli

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg")
SSV2_LABELS = "something-something-v2-labels.json"
SSV1_LABELS = "something-something-v1-labels.csv"
SSV1_FRAMES = "20bn-something-something-v1"  # the folder the official archive unpacks to
K400_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


@dataclasses.dataclass
class Entry:
  names: tuple[str, ...]   # file names without extension to look for, preferred first
  label: int


@dataclasses.dataclass
class Written:
  path: str                # the list file
  total: int               # videos in the annotation
  written: int
  missing: list[str]       # first name looked for, per missing video


# ----------------------------------------------------------------------------- annotations


def _load_json(path: str) -> object:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise cli.UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def ssv2_classes(labels_json: str) -> list[str]:
  """Class names in label order from something-something-v2-labels.json ({name: "index"})."""
  labels = _load_json(labels_json)
  try:
    order = sorted((int(i), name) for name, i in labels.items())  # type: ignore[union-attr]
  except (AttributeError, TypeError, ValueError):
    raise cli.UserError(f"{labels_json}: expected the SSv2 label file, a JSON object "
                           f"{{\"class name\": \"index\", ...}}") from None
  if [i for i, _ in order] != list(range(len(order))):
    raise cli.UserError(f"{labels_json}: the indices are not 0..{len(order) - 1}")
  return [name for _, name in order]


def ssv2_entries(annotation_json: str, classes: Sequence[str]) -> list[Entry]:
  """Entries of something-something-v2-{train,validation}.json: [{"id", "template", ...}]."""
  data = _load_json(annotation_json)
  index = {name: i for i, name in enumerate(classes)}
  if not isinstance(data, list) or not all(isinstance(v, dict) and "id" in v for v in data):
    raise cli.UserError(f"{annotation_json}: expected the SSv2 annotation file, a JSON list "
                           f"of {{\"id\": ..., \"template\": ...}} objects")
  if data and "template" not in data[0]:
    raise cli.UserError(f"{annotation_json}: its entries have no 'template' (labels); the "
                           f"test set is unlabelled: give the train and validation files")
  out, unknown = [], set()
  for v in data:
    name = v["template"].replace("[", "").replace("]", "")  # SlowFast's ssv2 rule
    if name not in index:
      unknown.add(name)
      continue
    out.append(Entry((str(v["id"]),), index[name]))
  if unknown:
    raise cli.UserError(f"{annotation_json}: {len(unknown)} template(s) not among the "
                           f"classes, e.g. {sorted(unknown)[:3]}: is --labels (or --classes) "
                           f"of the same release?")
  return out


def read_kinetics_csv(path: str) -> list[dict[str, str]]:
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
      header = f"{','.join(rows[0])}" if rows else ""
  except OSError as e:
    raise cli.UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None
  if not rows or any(c not in rows[0] for c in K400_COLUMNS):
    raise cli.UserError(f"{path}: expected the Kinetics CSV with the header "
                           f"'label,youtube_id,time_start,time_end,split', got "
                           f"{header or 'no rows'!r}")
  empty = sum(not r["label"] for r in rows)
  if empty:
    raise cli.UserError(f"{path}: {empty} row(s) without a label (the test set?); give "
                           f"labelled files")
  return rows


def read_classes(path: str) -> list[str]:
  """Class names in label order: one a line, or `name<TAB>index` lines in any order."""
  lines = [l for l in _read_lines(path) if l.strip()]
  pairs = [l.rsplit("\t", 1) for l in lines]
  if all(len(p) == 2 and p[1].strip().isdigit() for p in pairs):
    order = sorted((int(i), name.strip()) for name, i in pairs)
    if [i for i, _ in order] != list(range(len(order))):
      raise cli.UserError(f"{path}: the indices are not 0..{len(order) - 1}")
    return [name for _, name in order]
  return [l.strip() for l in lines]


def kinetics_entries(rows: list[dict[str, str]], classes: Sequence[str], path: str
                     ) -> list[Entry]:
  index = {name: i for i, name in enumerate(classes)}
  unknown = sorted({r["label"] for r in rows} - set(index))
  if unknown:
    raise cli.UserError(f"{path}: {len(unknown)} class(es) not in the class list, e.g. "
                           f"{unknown[:3]}")
  out = []
  for r in rows:
    yid = r["youtube_id"]
    start, end = int(float(r["time_start"])), int(float(r["time_end"]))
    out.append(Entry((f"{yid}_{start:06d}_{end:06d}", yid), index[r["label"]]))
  return out


def _read_lines(path: str) -> list[str]:
  try:
    with open(path, encoding="utf-8-sig") as f:
      return f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise cli.UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def ssv1_classes(labels_csv: str) -> list[str]:
  """Class names in label order from something-something-v1-labels.csv (one name a line):
  sorted, as TSM's gen_label_sthv1.py (module docstring)."""
  names = [l.strip() for l in _read_lines(labels_csv) if l.strip()]
  if not names:
    raise cli.UserError(f"{labels_csv}: no class names (expected one label name a line)")
  bad = [n for n in names if ";" in n]
  if bad:
    raise cli.UserError(f"{labels_csv}: expected one label name a line, got {bad[0]!r} "
                           f"(an 'id;label' list? pass the labels file as --labels)")
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise cli.UserError(f"{labels_csv}: {len(dup)} name(s) listed twice, e.g. {dup[0]!r}")
  return sorted(names)


def ssv1_entries(list_csv: str, classes: Sequence[str]) -> list[Entry]:
  """Entries of something-something-v1-{train,validation}.csv (`id;label name` lines)."""
  index = {name: i for i, name in enumerate(classes)}
  out = []
  for lineno, line in enumerate(_read_lines(list_csv), 1):
    line = line.strip()
    if not line:
      continue
    vid, sep, name = (x.strip() for x in line.partition(";"))
    if not sep or not name:
      raise cli.UserError(f"{list_csv}:{lineno}: expected 'id;label name' (the SSv1 list "
                             f"format), got {line!r}"
                             + ("; no label: the test set? give the train and validation "
                                "lists" if not sep else ""))
    if not vid or "/" in vid or vid in (".", ".."):
      raise cli.UserError(f"{list_csv}:{lineno}: {vid!r} is not a video id (expected "
                             f"'id;label name', got {line!r})")
    if name not in index:
      raise cli.UserError(f"{list_csv}:{lineno}: label {name!r} is not among the "
                             f"{len(classes)} class names (is --labels / --classes of the "
                             f"same release?)")
    out.append(Entry((vid,), index[name]))
  if not out:
    raise cli.UserError(f"{list_csv}: lists no videos (expected 'id;label name' lines)")
  return out


# ----------------------------------------------------------------------------- videos


def index_videos(root: str) -> tuple[dict[str, str], int]:
  """({file name without extension: path relative to root}, duplicates): every video file
  under root (first in sorted order wins a duplicate name)."""
  found: dict[str, str] = {}
  duplicates = 0
  for d, dirs, files in os.walk(root, followlinks=True):
    dirs.sort()
    for f in sorted(files):
      stem, ext = os.path.splitext(f)
      if ext.lower() in VIDEO_EXTS:
        if stem in found:
          duplicates += 1
        else:
          found[stem] = os.path.relpath(os.path.join(d, f), root)
  return found, duplicates


def write_list(entries: Sequence[Entry], videos: dict[str, str], out: str,
               prefix: str = "") -> Written:
  """Writes `relative/path label` lines for the entries found in `videos`; the missing
  ones to out + '.missing.txt' (removed when none is missing)."""
  lines, missing = [], []
  for e in entries:
    rel = next((videos[n] for n in e.names if n in videos), None)
    if rel is None:
      missing.append(e.names[0])
    else:
      lines.append(f"{os.path.join(prefix, rel)} {e.label}\n")
  if lines:
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(lines)
    os.replace(tmp, out)
  if missing:
    with open(out + ".missing.txt", "w") as f:
      f.writelines(m + "\n" for m in missing)
  elif os.path.exists(out + ".missing.txt"):
    os.remove(out + ".missing.txt")
  return Written(out, len(entries), len(lines), missing)


def convert(dataset: str, data_dir: str, annotations: dict[str, str],
            labels: str | None = None, classes: str | None = None,
            videos: str | None = None) -> list[Written]:
  """Writes DATA_DIR/<list> for each {list file name: annotation file} and
  DATA_DIR/classes.txt (module docstring); returns what was written per list."""
  if dataset not in ("ssv1", "ssv2", "kinetics400"):
    raise cli.UserError(f"--dataset={dataset}: 'ssv1', 'ssv2' or 'kinetics400'")
  if not annotations:
    raise cli.UserError("give at least one annotation file: --train=... and/or --val=...")
  if not os.path.isdir(data_dir):
    raise cli.UserError(f"--data_dir={data_dir} is not a directory (the one holding the "
                           f"videos, where the list files are written)")
  for name, src in annotations.items():
    if not os.path.isfile(src):
      raise cli.UserError(f"annotation file {src} not found")
    out = os.path.join(data_dir, name)
    if os.path.exists(out) and os.path.samefile(out, src):
      raise cli.UserError(f"{src} would be overwritten by the list {name}: keep the "
                             f"annotations outside --data_dir or under another name")
  if dataset == "ssv1":
    if classes:
      names = read_classes(classes)
    else:
      labels = labels or os.path.join(os.path.dirname(next(iter(annotations.values()))),
                                      SSV1_LABELS)
      if not os.path.isfile(labels):
        raise cli.UserError(f"{labels} not found: pass --labels=.../{SSV1_LABELS}")
      names = ssv1_classes(labels)
    entries = {n: ssv1_entries(src, names) for n, src in annotations.items()}
  elif dataset == "ssv2" and classes:
    names = [n.replace("[", "").replace("]", "") for n in read_classes(classes)]
    entries = {n: ssv2_entries(src, names) for n, src in annotations.items()}
  elif dataset == "ssv2":
    labels = labels or os.path.join(os.path.dirname(next(iter(annotations.values()))),
                                    SSV2_LABELS)
    if not os.path.isfile(labels):
      raise cli.UserError(f"{labels} not found: pass --labels=.../{SSV2_LABELS}")
    names = ssv2_classes(labels)
    entries = {n: ssv2_entries(src, names) for n, src in annotations.items()}
  else:
    rows = {n: read_kinetics_csv(src) for n, src in annotations.items()}
    names = (read_classes(classes) if classes else
             sorted({r["label"] for rs in rows.values() for r in rs}))
    if not classes and len(names) != 400:
      print(f"note: {len(names)} classes in the given CSVs (Kinetics-400 has 400): train with "
            f"--config.data.num_classes={len(names)}", file=sys.stderr)
    entries = {n: kinetics_entries(rows[n], names, annotations[n]) for n in annotations}
  if dataset == "ssv1" and not videos and os.path.isdir(os.path.join(data_dir, SSV1_FRAMES)):
    videos = SSV1_FRAMES
  root = os.path.join(data_dir, videos) if videos else data_dir
  if dataset == "ssv1":
    # {id: id} for the entries whose folder root/<id> exists (looked up, not walked)
    found = {n: n for e in entries.values() for x in e for n in x.names
             if os.path.isdir(os.path.join(root, n))}
  else:
    found, duplicates = index_videos(root)
    if duplicates:
      print(f"note: {duplicates} video file name(s) occur more than once under {root}; the "
            f"first in sorted path order is listed", file=sys.stderr)
  for src, e in zip(annotations.values(), entries.values()):  # before writing anything
    if not any(n in found for x in e for n in x.names):
      where = (f"as frame folders under {root} (looked for folders such as "
               f"{e[0].names[0]}/): point --data_dir (or --videos) at the folder holding the "
               f"<id>/ folders"
               if dataset == "ssv1" else
               f"among the {len(found)} video files under {root} (looked for names such as "
               f"{e[0].names[0]}.mp4/.webm/...): point --data_dir (or --videos) at the videos")
      raise cli.UserError(f"none of the {len(e)} videos of {src} found {where}")
  prefix = os.path.relpath(root, data_dir)
  written = [write_list(e, found, os.path.join(data_dir, n), "" if prefix == "." else prefix)
             for n, e in entries.items()]
  with open(os.path.join(data_dir, "classes.txt"), "w") as f:
    f.writelines(n + "\n" for n in names)
  return written


def summary(written: Sequence[Written]) -> str:
  lines = []
  for w in written:
    lines.append(f"{w.path}: {w.written} of {w.total} videos")
    if w.missing:
      lines[-1] += (f"; {len(w.missing)} not found (e.g. {', '.join(w.missing[:3])}; all in "
                    f"{w.path}.missing.txt)")
  return "\n".join(lines)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Defined only when run as a program: prepare.py defines --dataset / --data_dir too.
  flags.DEFINE_enum("dataset", None, ["ssv1", "ssv2", "kinetics400"], "Whose annotations.")
  flags.DEFINE_string("data_dir", None, "The videos' directory; the lists are written here.")
  flags.DEFINE_string("train", None, "Train annotations (SSv1 CSV / SSv2 JSON / Kinetics CSV).")
  flags.DEFINE_string("val", None, "Validation annotations (SSv1 CSV / SSv2 JSON / Kinetics "
                      "CSV).")
  flags.DEFINE_string("train_list", "train.csv", "Name of the train list written.")
  flags.DEFINE_string("val_list", "val.csv", "Name of the validation list written.")
  flags.DEFINE_string("labels", None, f"SSv2: {SSV2_LABELS}; SSv1: {SSV1_LABELS} (default: "
                      f"next to --train).")
  flags.DEFINE_string("classes", None, "Class order (one name a line, or 'name<TAB>index'); "
                      "default: Kinetics: the sorted class names; SSv2: --labels; SSv1: the "
                      "sorted names of --labels.")
  flags.DEFINE_string("videos", None, "Sub-directory of --data_dir to search for the videos "
                      f"(SSv1: holding the <id>/ frame folders; default {SSV1_FRAMES} if it "
                      "exists).")
  flags.mark_flags_as_required(["dataset", "data_dir"])


def main(argv: Sequence[str]) -> None:
  del argv
  annotations = {n: src for n, src in ((FLAGS.train_list, FLAGS.train),
                                       (FLAGS.val_list, FLAGS.val)) if src}
  print(summary(convert(FLAGS.dataset, FLAGS.data_dir, annotations, FLAGS.labels,
                        FLAGS.classes, FLAGS.videos)))


if __name__ == "__main__":
  _define_flags()
  cli.run(main, workdir_flag=None)
