"""TensorFlow-free tfds builders for image classification data, and the reader.

ArrayRecord shards (why: docs/platform_notes.md, "tfds without TensorFlow") with the
features of the official tfds `imagenet2012`: image (the source JPEG bytes as they are),
label (ClassLabel), file_name (Text: the path relative to the split directory), so official
`imagenet2012` ArrayRecord data and ours are read by the same code (`open_split`).

The examples to write are given to the builder (a list of `Item` per split, decided by
prepare.py); a builder instance writes exactly the splits it is given, which lets
prepare.py build one split at a time and resume after an interruption.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import re
import tarfile
import types
from typing import Any, Iterator

from etils import epath
import tensorflow_datasets as tfds

_TFDS_IMAGENET = "datasets/imagenet2012"  # label names / validation labels shipped with tfds


@dataclasses.dataclass(frozen=True)
class Item:
  """One image to write: a file, or a member of a tar file (`member` set), or of a tar
  inside a tar (`inner`: ILSVRC2012_img_train.tar's per-class tars, read in place)."""
  path: str
  label: int
  file_name: str            # stored in the `file_name` feature; unique within the split
  member: str | None = None
  reencode: bool = False    # not an RGB JPEG (PNG, CMYK, grey): stored re-encoded as RGB JPEG
  inner: str | None = None  # the member of tar `path` that is the tar holding `member`


@functools.lru_cache(maxsize=4)
def _inner_tars(path: str, mtime_ns: int, size: int) -> dict[str, tarfile.TarInfo]:
  """The members of an outer tar, by name: one pass over its headers per process (the
  data in between is skipped by seeking)."""
  del mtime_ns, size  # cache key only: a rewritten tar is scanned again
  with tarfile.open(path) as tar:
    return {m.name: m for m in tar if m.isfile()}


@contextlib.contextmanager
def open_tar(path: str, inner: str | None = None) -> Iterator[tarfile.TarFile]:
  """The tar file `path`, or its member tar `inner`, opened for random access in place
  (nothing extracted to disk)."""
  if inner is None:
    with tarfile.open(path) as tar:
      yield tar
    return
  st = os.stat(path)
  info = _inner_tars(path, st.st_mtime_ns, st.st_size)[inner]
  with tarfile.open(path) as outer:  # reads the first header only; extractfile seeks
    with tarfile.open(fileobj=outer.extractfile(info)) as tar:
      yield tar


def read_bytes(item: Item) -> bytes:
  if item.member is None:
    with open(item.path, "rb") as f:
      return f.read()
  with open_tar(item.path, item.inner) as tar:
    return tar.extractfile(item.member).read()


def to_rgb_jpeg(data: bytes) -> bytes:
  """Re-encodes any PIL-readable image as an RGB JPEG (what the official builder does for
  the few PNG/CMYK files in ImageNet)."""
  from PIL import Image
  out = io.BytesIO()
  Image.open(io.BytesIO(data)).convert("RGB").save(out, "JPEG", quality=95)
  return out.getvalue()


def imagenet_label_names() -> list[str]:
  """The 1000 WordNet ids in the official tfds `imagenet2012` label order."""
  path = tfds.core.tfds_path(f"{_TFDS_IMAGENET}/labels.txt")
  return path.read_text().split()


def imagenet_validation_labels() -> list[str]:
  """WordNet ids of ILSVRC2012_val_00000001.JPEG ... _00050000.JPEG, in that order."""
  return tfds.core.tfds_path(f"{_TFDS_IMAGENET}/validation_labels.txt").read_text().split()


class _ImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the given `Item`s; subclasses set name, VERSION and the label names."""

  pkg_dir_path = epath.Path(__file__).parent  # no dataset package dir (docs/platform_notes.md)
  # tfds' own code_path() needs the `importlib_resources` backport for modules in a
  # package (a tfds bug on Python >= 3.9); there are no checksums to find next to us.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, items: dict[str, list[Item]] | None = None,
               label_names: list[str] | None = None, **kwargs: Any):
    self._items = items or {}
    self._label_names = label_names
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=self._label_names),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager
    return {split: self._generate_examples(items) for split, items in self._items.items()}

  def _generate_examples(self, items: list[Item]) -> Iterator[tuple[str, dict[str, Any]]]:
    with contextlib.ExitStack() as open_one:
      tar, tar_key = None, None
      for item in items:
        if item.member is None:
          data = read_bytes(item)
        else:  # members are grouped by tar: keep one open
          if tar_key != (item.path, item.inner):
            open_one.close()
            tar = open_one.enter_context(open_tar(item.path, item.inner))
            tar_key = (item.path, item.inner)
          data = tar.extractfile(item.member).read()
        if item.reencode:
          data = to_rgb_jpeg(data)
        # Bytes go into the Image feature unchanged (no TF needed to encode them).
        yield item.file_name, {"image": data, "label": item.label, "file_name": item.file_name}


class Imagenet2012(_ImageBuilder, skip_registration=True):
  """ImageNet-1K from the raw train/val images (same features and labels as tfds')."""
  name = "imagenet2012"
  VERSION = tfds.core.Version("5.1.0")  # the official version: one reader for both

  def __init__(self, **kwargs: Any):
    super().__init__(label_names=imagenet_label_names(), **kwargs)


class ImageFolder(_ImageBuilder, skip_registration=True):
  """split/class/*.jpg folders; class names sorted -> labels 0..C-1."""
  name = "image_folder"


_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def builder_class(dataset: str, name: str | None = None) -> type[_ImageBuilder]:
  """The builder for --dataset; image folders can be given another tfds `name` (so that
  several live side by side in one data_dir)."""
  if dataset == "imagenet2012":
    return Imagenet2012
  if dataset != "image_folder":
    raise ValueError(f"unknown dataset {dataset!r}: 'imagenet2012' or 'image_folder'")
  name = name or "image_folder"
  if not _NAME_RE.match(name):
    raise ValueError(f"dataset name {name!r} must be snake_case ([a-z][a-z0-9_]*)")
  if name == "image_folder":
    return ImageFolder
  return types.new_class(f"ImageFolder_{name}", (ImageFolder,), {"skip_registration": True},
                         lambda ns: ns.update(name=name))


# ----------------------------------------------------------------------------- reading


def _version_key(path: epath.Path) -> tuple[int, ...]:
  return tuple(int(x) for x in path.name.split(".")) if re.fullmatch(r"\d+\.\d+\.\d+",
                                                                    path.name) else (-1,)


def find_prepared(data_dir: str, name: str) -> epath.Path | None:
  """DATA_DIR/NAME/[CONFIG/]VERSION holding dataset_info.json (newest version), or None."""
  root = epath.Path(data_dir) / name
  if not root.is_dir():
    return None
  found = [p.parent for pattern in ("*/dataset_info.json", "*/*/dataset_info.json")
           for p in root.glob(pattern) if ".incomplete" not in os.fspath(p)
           and _version_key(p.parent) != (-1,)]
  return max(found, key=_version_key) if found else None


def open_split(prepared_dir: epath.Path, split: str) -> tuple[Any, int, str]:
  """(random-access source of dict(image=JPEG bytes, label, file_name), num_classes,
  file format). Images stay encoded: the pipeline decodes them (and replaces bad ones)."""
  builder = tfds.builder_from_directory(prepared_dir)
  fmt = builder.info.file_format
  if fmt is None or fmt.value not in ("array_record", "parquet"):
    raise ValueError(f"{prepared_dir} holds {fmt.value if fmt else 'unknown'} files; random "
                     "access (grain) needs array_record. Prepare it again with "
                     "structvit_jax.data.prepare (writes array_record).")
  if split not in builder.info.splits:
    raise KeyError(f"split {split!r} not in {prepared_dir} (has "
                   f"{', '.join(builder.info.splits)}): choose one with "
                   f"--config.data.eval_split=... or --config.data.train_split=...")
  source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return source, builder.info.features["label"].num_classes, fmt.value
