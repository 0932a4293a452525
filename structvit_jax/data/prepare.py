r"""Prepare image datasets as tfds ArrayRecord data, without TensorFlow.

  python -m structvit_jax.data.prepare --dataset=image_folder --src=DIR --data_dir=OUT \
      [--name=image_folder] [--workers=4]
  python -m structvit_jax.data.prepare --dataset=imagenet2012 --src=RAW --data_dir=OUT
  python -m structvit_jax.data.prepare --dataset=imagenet2012 \
      --src=ILSVRC2012_img_train.tar --data_dir=OUT

Source layouts, output directories and unreadable files: README.md, "Images". image_folder:
every subdirectory of DIR is a split; labels are the sorted class names over all splits.
imagenet2012: flat val images without a label file are labelled by tfds' own
validation_labels.txt (sorted file names); the official ILSVRC2012_img_train.tar (1000
per-class tars inside one tar) and ILSVRC2012_img_val.tar are read in place, never
extracted. Resumable: each split is checked and written on
its own under OUT/<name>/.prepare/<split>/ (check results cached in files.tsv, a finished
split has its dataset_info.json); the splits are merged into the final directory only when
every split is complete.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
from typing import Iterable, Sequence

from absl import app, flags, logging
from etils import epath
import tensorflow_datasets as tfds

from structvit_jax import cli
from structvit_jax.data import builders
from structvit_jax.data.builders import Item

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass
class Summary:
  directory: str                                   # the prepared dataset (with the version)
  num_examples: dict[str, int]
  skipped: dict[str, list[str]]                    # unreadable files per split
  resumed: list[str] = dataclasses.field(default_factory=list)  # splits found complete


# ----------------------------------------------------------------------------- discovery


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(split_dir: str) -> list[str]:
  return sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))


def _images_under(class_dir: str) -> list[str]:
  """Image paths relative to class_dir, nested sub-folders included, sorted."""
  out = []
  for root, dirs, files in os.walk(class_dir, followlinks=True):
    dirs.sort()
    rel = os.path.relpath(root, class_dir)
    out += [f if rel == "." else os.path.join(rel, f) for f in sorted(files) if _is_image(f)]
  return out


def _files_in_classes(split_dir: str, label_of: dict[str, int]) -> list[Item]:
  items = []
  for cls in _class_dirs(split_dir):
    for f in _images_under(os.path.join(split_dir, cls)):
      items.append(Item(os.path.join(split_dir, cls, f), label_of[cls], f"{cls}/{f}"))
  loose = [f for f in os.listdir(split_dir)
           if _is_image(f) and os.path.isfile(os.path.join(split_dir, f))]
  if loose:
    logging.warning("%s: %d image(s) outside any class folder left out (e.g. %s); move them "
                    "into <split>/<class>/", split_dir, len(loose), sorted(loose)[0])
  return items


def discover_image_folder(src: str) -> tuple[dict[str, list[Item]], list[str]]:
  splits = _class_dirs(src)
  if not splits:
    raise FileNotFoundError(f"no split directories in {src} (expected {src}/<split>/<class>/"
                            "<image>, e.g. train/ and validation/)")
  names = sorted({c for s in splits for c in _class_dirs(os.path.join(src, s))})
  label_of = {c: i for i, c in enumerate(names)}
  return {s: _files_in_classes(os.path.join(src, s), label_of) for s in splits}, names


def _tar_items(path: str, label: int, cls: str) -> list[Item]:
  with tarfile.open(path) as tar:
    return [Item(path, label, f"{cls}/{os.path.basename(m.name)}", member=m.name)
            for m in sorted(tar.getmembers(), key=lambda m: m.name)
            if m.isfile() and _is_image(m.name)]


def _val_labels(src: str, files: Sequence[str], names: list[str]) -> dict[str, str]:
  """file name -> WordNet id for a flat validation folder (README.md, "Images")."""
  for d in (src, os.path.join(src, "val"), os.path.join(src, "validation")):
    p = os.path.join(d, "LOC_val_solution.csv")
    if os.path.exists(p):
      with open(p) as f:
        return {r["ImageId"] + ".JPEG": r["PredictionString"].split()[0]
                for r in csv.DictReader(f)}
    p = os.path.join(d, "val_labels.txt")
    if os.path.exists(p):
      out = {}
      for line in open(p).read().splitlines():
        if line.strip():
          fname, label = line.split()[:2]
          out[os.path.basename(fname)] = names[int(label)] if label.isdigit() else label
      return out
  official = builders.imagenet_validation_labels()
  if len(files) != len(official):
    raise FileNotFoundError(
        f"{len(files)} flat validation images and no LOC_val_solution.csv / val_labels.txt in "
        f"{src}; tfds' own label list needs exactly the {len(official)} ILSVRC2012_val files")
  return dict(zip(sorted(files), official))


TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"


def _open_outer(path: str) -> tarfile.TarFile:
  try:
    return tarfile.open(path, "r:")  # the official tars are not compressed
  except (tarfile.TarError, OSError) as e:
    raise cli.UserError(
        f"{path}: not a readable tar file ({type(e).__name__}: {e}); expected the official "
        f"{TRAIN_TAR} (download it again if it is truncated)") from None


def _outer_tar_items(path: str, label_of: dict[str, int]) -> list[Item]:
  """Train items of ILSVRC2012_img_train.tar: its members n*.tar, each a tar of that class's
  JPEGs, listed header by header (the image data is skipped by seeking)."""
  items: list[Item] = []
  others: list[str] = []
  with _open_outer(path) as outer:
    try:
      members = sorted((m for m in outer if m.isfile()), key=lambda m: m.name)
    except (tarfile.TarError, OSError, EOFError) as e:
      raise cli.UserError(f"{path}: the tar is truncated or corrupt ({type(e).__name__}: "
                             f"{e}); download {TRAIN_TAR} again") from None
    for m in members:
      cls, ext = os.path.splitext(os.path.basename(m.name))
      if ext != ".tar" or cls not in label_of:
        others.append(m.name)
        continue
      try:
        with tarfile.open(fileobj=outer.extractfile(m)) as inner:
          names = sorted(i.name for i in inner if i.isfile() and _is_image(i.name))
      except (tarfile.TarError, OSError, EOFError) as e:
        raise cli.UserError(
            f"{path}: its member {m.name} is not a readable tar ({type(e).__name__}: {e}); "
            f"the download is corrupt: download {TRAIN_TAR} again") from None
      items += [Item(path, label_of[cls], f"{cls}/{os.path.basename(n)}", member=n,
                     inner=m.name) for n in names]
  if not items:
    images = sum(_is_image(n) for n in others)
    what = (f"{images} image files directly (is it {VAL_TAR}? put it next to {TRAIN_TAR} "
            f"in a --src directory)" if images else
            f"{len(others)} other files (e.g. {others[:3]})" if others else "nothing")
    raise cli.UserError(
        f"{path}: expected {TRAIN_TAR}, a tar of the 1000 per-class tars n01440764.tar ... "
        f"(WordNet ids of the tfds imagenet2012 labels); it holds {what}")
  if others:
    logging.warning("%s: %d member(s) that are not per-class n*.tar files left out (e.g. %s)",
                    path, len(others), others[:3])
  return items


def _val_tar_items(path: str, src: str, names: list[str], label_of: dict[str, int]
                   ) -> list[Item]:
  """ILSVRC2012_img_val.tar: the 50,000 flat validation JPEGs, labelled as a flat val/."""
  with _open_outer(path) as tar:
    members = {os.path.basename(m.name): m.name for m in tar if m.isfile()
               and _is_image(m.name)}
  files = sorted(members)
  labels = _val_labels(src, files, names)
  missing = [f for f in files if f not in labels]
  if missing:
    raise ValueError(f"no label for {len(missing)} validation files, e.g. {missing[:3]}")
  return [Item(path, label_of[labels[f]], f, member=members[f]) for f in files]


def discover_imagenet(src: str) -> tuple[dict[str, list[Item]], list[str]]:
  names = builders.imagenet_label_names()
  label_of = {c: i for i, c in enumerate(names)}
  if os.path.isfile(src):  # --src=ILSVRC2012_img_train.tar: the train split only
    return {"train": _outer_tar_items(src, label_of)}, names
  train_dir = os.path.join(src, "train")
  items: dict[str, list[Item]] = {"train": []}
  if os.path.isdir(train_dir):
    for entry in sorted(os.listdir(train_dir)):
      cls, ext = os.path.splitext(entry)
      path = os.path.join(train_dir, entry)
      if ext == ".tar" and cls in label_of:
        items["train"] += _tar_items(path, label_of[cls], cls)
      elif os.path.isdir(path) and entry in label_of:
        items["train"] += [Item(os.path.join(path, f), label_of[entry], f"{entry}/{f}")
                           for f in sorted(os.listdir(path)) if _is_image(f)]
  elif os.path.isfile(os.path.join(src, TRAIN_TAR)):
    items["train"] = _outer_tar_items(os.path.join(src, TRAIN_TAR), label_of)
  else:
    raise FileNotFoundError(f"{train_dir} not found (expected n*/ class folders or n*.tar, "
                            f"or {TRAIN_TAR} in {src})")
  val_dir = next((os.path.join(src, d) for d in ("val", "validation")
                  if os.path.isdir(os.path.join(src, d))), None)
  if val_dir is not None:
    if any(d in label_of for d in _class_dirs(val_dir)):
      items["validation"] = _files_in_classes(val_dir, label_of)
    else:
      files = sorted(f for f in os.listdir(val_dir) if _is_image(f))
      labels = _val_labels(src, files, names)
      missing = [f for f in files if f not in labels]
      if missing:
        raise ValueError(f"no label for {len(missing)} validation files, e.g. {missing[:3]}")
      items["validation"] = [Item(os.path.join(val_dir, f), label_of[labels[f]], f)
                             for f in files]
  elif os.path.isfile(os.path.join(src, VAL_TAR)):
    items["validation"] = _val_tar_items(os.path.join(src, VAL_TAR), src, names, label_of)
  return items, names


# ----------------------------------------------------------------------------- checking


def check_image(item: Item) -> str:
  """'ok' | 'reencode' (readable, but not an RGB JPEG) | 'error: ...' (unreadable)."""
  try:
    return check_bytes(builders.read_bytes(item))
  except Exception as e:  # unreadable file
    return f"error: {type(e).__name__}: {e}".replace("\t", " ").replace("\n", " ")


def check_tar(path: str | tuple[str, str | None]) -> dict[str, str]:
  """check_image for every member of one tar (a path, or (outer tar, inner tar member)),
  read in one pass (not one open per member)."""
  path, inner = (path, None) if isinstance(path, str) else path
  with builders.open_tar(path, inner) as tar:
    return {m.name: check_bytes(tar.extractfile(m).read()) for m in tar if m.isfile()}


def check_bytes(data: bytes) -> str:
  from PIL import Image
  try:
    im = Image.open(io.BytesIO(data))
    fmt, mode = im.format, im.mode
    im.draft("RGB", (1, 1))  # DCT-domain downscale: still reads (and checks) all the data
    im.load()
    return "ok" if fmt == "JPEG" and mode == "RGB" else "reencode"
  except Exception as e:  # any failure means the file cannot be used
    return f"error: {type(e).__name__}: {e}".replace("\t", " ").replace("\n", " ")


def _progress(iterable: Iterable, total: int, desc: str) -> Iterable:
  try:
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="img", mininterval=2.0)
  except ImportError:  # plain counter
    def gen():
      for i, x in enumerate(iterable, 1):
        if i % 1000 == 0 or i == total:
          print(f"\r{desc}: {i}/{total}", end="\n" if i == total else "", file=sys.stderr)
        yield x
    return gen()


def _check_split(items: list[Item], workers: int, desc: str) -> list[str]:
  """Status of every item (check_image), on `workers` processes."""
  files = [it for it in items if it.member is None]
  tars = sorted({(it.path, it.inner) for it in items if it.member is not None},
                key=lambda t: (t[0], t[1] or ""))
  pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
  imap = pool.imap if pool else lambda f, xs, chunksize: map(f, xs)
  try:
    status = {(it.path, None): s for it, s in zip(files, _progress(
        imap(check_image, files, chunksize=64), len(files), desc))}
    for tar, result in zip(tars, _progress(imap(check_tar, tars, chunksize=1), len(tars),
                                           desc + " (tar files)")):
      status.update({(*tar, m): s for m, s in result.items()})
  finally:
    if pool:  # every result has been read by now
      pool.terminate()
      pool.join()
  return [status[(it.path, it.inner, it.member) if it.member else (it.path, None)]
          for it in items]


# ----------------------------------------------------------------------------- prepare


def _write_table(path: epath.Path, items: list[Item], status: list[str]) -> None:
  tmp = path.with_suffix(".tmp")
  with open(tmp, "w") as f:
    for it, s in zip(items, status):
      f.write(f"{it.file_name}\t{s}\n")
  os.replace(tmp, path)  # atomic: present means complete


def _read_table(path: epath.Path) -> dict[str, str]:
  return dict(line.split("\t", 1) for line in path.read_text().splitlines())


def prepare(dataset: str, src: str, data_dir: str, name: str | None = None,
            workers: int = 1, verify: bool = True) -> Summary:
  """Prepares `dataset` from `src` into `data_dir` (module docstring); `verify=False`
  skips the decode check (tests use it to store corrupt bytes on purpose)."""
  cls = builders.builder_class(dataset, name)
  final = epath.Path(data_dir) / cls.name / str(cls.VERSION)
  if (final / "dataset_info.json").exists():
    info = tfds.builder_from_directory(final).info
    logging.info("%s is already prepared; nothing to do.", final)
    if (final.parent / ".prepare").exists():  # killed just after the final rename
      shutil.rmtree(final.parent / ".prepare")
    skipped: dict[str, list[str]] = {s: [] for s in info.splits}
    if (final / "skipped_files.txt").exists():
      for line in (final / "skipped_files.txt").read_text().splitlines():
        split, path = line.split("\t", 1)
        skipped.setdefault(split, []).append(path)
    summary = Summary(os.fspath(final), {s: v.num_examples for s, v in info.splits.items()},
                      skipped, resumed=list(info.splits))
    _log_summary(summary)
    return summary
  if not (os.path.isdir(src) or dataset == "imagenet2012" and os.path.isfile(src)):
    raise FileNotFoundError(f"--src={src} is not a directory (the raw images; layouts: "
                            "python -m structvit_jax.data.prepare --helpfull)")
  items, label_names = (discover_imagenet(src) if dataset == "imagenet2012"
                        else discover_image_folder(src))
  staging = epath.Path(data_dir) / cls.name / ".prepare"
  summary = Summary(os.fspath(final), {}, {})
  for split, split_items in items.items():
    work = staging / split
    work.mkdir(parents=True, exist_ok=True)
    table = work / "files.tsv"
    if table.exists() and set(_read_table(table)) != {it.file_name for it in split_items}:
      logging.warning("split %s: the files in --src changed since the interrupted run; "
                      "preparing it again", split)
      shutil.rmtree(work)
      work.mkdir(parents=True)
    if not table.exists():
      status = (_check_split(split_items, workers, f"checking {split}") if verify
                else ["ok"] * len(split_items))
      _write_table(table, split_items, status)
    status_of = _read_table(table)
    bad = []
    for it in split_items:
      if status_of[it.file_name].startswith("error"):
        bad.append(it.path + (f"[{it.inner}/{it.member}]" if it.inner else
                              f"[{it.member}]" if it.member else ""))
        logging.warning("skipping unreadable %s: %s", bad[-1], status_of[it.file_name])
    keep = [dataclasses.replace(it, reencode=status_of[it.file_name] == "reencode")
            for it in split_items if not status_of[it.file_name].startswith("error")]
    if not keep:  # tfds would stop with "No examples were yielded"
      raise cli.UserError(
          f"split {split}: none of its {len(split_items)} image(s) in {src} can be read"
          + (f" (e.g. {bad[0]}: "
             f"{status_of[split_items[0].file_name].removeprefix('error: ')})" if bad else "")
          + "; fix or remove them (or the split folder) and run again")
    summary.skipped[split] = bad
    summary.num_examples[split] = len(keep)
    split_builder = cls(data_dir=os.fspath(work), file_format="array_record",
                        items={split: keep}, **({"label_names": label_names}
                                                if dataset == "image_folder" else {}))
    if (epath.Path(split_builder.data_dir) / "dataset_info.json").exists():
      logging.info("split %s: already written, skipping", split)
      summary.resumed.append(split)
      continue
    logging.info("split %s: writing %d examples", split, len(keep))
    split_builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  if "validation" not in items:
    logging.warning("no 'validation' split in %s (splits: %s): train with "
                    "--config.data.eval_split=<one of them>", src, ", ".join(items))
  _merge(cls, staging, list(items), final, label_names if dataset == "image_folder" else None,
         summary.skipped)
  shutil.rmtree(staging)
  _log_summary(summary)
  return summary


def _merge(cls: type, staging: epath.Path, splits: list[str], final: epath.Path,
           label_names: list[str] | None, skipped: dict[str, list[str]]) -> None:
  """Moves every split's shards into one directory with one dataset_info.json."""
  tmp = final.parent / (final.name + ".merging")
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  infos = []
  for split in splits:
    split_dir = epath.Path(tfds.builder_from_directory(
        staging / split / cls.name / str(cls.VERSION)).data_dir)
    info = tfds.builder_from_directory(split_dir).info.splits[split]
    for f in split_dir.iterdir():
      if f.name.startswith(f"{cls.name}-{split}."):
        shutil.copy2(f, tmp / f.name)  # copy, not move: an interrupted merge can rerun
    infos.append(info)
  kwargs = {"label_names": label_names} if label_names is not None else {}
  builder = cls(data_dir=os.fspath(tmp), file_format="array_record", **kwargs)
  builder.info.set_splits(tfds.core.SplitDict(infos))
  builder.info.write_to_directory(tmp)
  (tmp / "skipped_files.txt").write_text(  # a lasting record of what prepare left out
      "".join(f"{split}\t{p}\n" for split, paths in skipped.items() for p in paths))
  os.replace(tmp, final)


def _log_summary(s: Summary) -> None:
  lines = [f"Prepared {s.directory}:"]
  for split, n in s.num_examples.items():
    lines.append(f"  {split}: {n} examples, {len(s.skipped.get(split, []))} unreadable files "
                 "skipped" + (" (resumed)" if split in s.resumed else ""))
    lines += [f"    skipped: {p}" for p in s.skipped.get(split, [])[:20]]
    if len(s.skipped.get(split, [])) > 20:
      lines.append(f"    ... and {len(s.skipped[split]) - 20} more")
  print("\n".join(lines))


FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", None, ["image_folder", "imagenet2012"], "What --src holds.")
flags.DEFINE_string("src", None, "Raw images (layouts: README.md, \"Images\").")
flags.DEFINE_string("data_dir", None, "tfds data directory to write into.")
flags.DEFINE_string("name", None, "tfds name of an image_folder dataset (default image_folder)"
                    "; set config.data.tfds_name to the same value to read it.")
flags.DEFINE_integer("workers", max(1, (os.cpu_count() or 2) // 2),
                     "Processes that decode-check the images.")


def main(argv: Sequence[str]) -> None:
  del argv
  t0 = time.time()
  prepare(FLAGS.dataset, FLAGS.src, FLAGS.data_dir, FLAGS.name, FLAGS.workers)
  logging.info("done in %.1f s", time.time() - t0)


if __name__ == "__main__":
  flags.mark_flags_as_required(["dataset", "src", "data_dir"])
  cli.run(main, workdir_flag=None)
