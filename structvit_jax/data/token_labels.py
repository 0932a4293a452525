r"""Token labels: the teacher's per-image top-k score maps, prepared beside the image data.

  python -m structvit_jax.data.token_labels --src=LABELS --data_dir=DATA_DIR \
      --out=DATA_DIR/token_labels [--name=imagenet2012] [--split=train]

LABELS is what the token-labeling authors distribute (docs/token_labeling.md): a folder
(or a .zip of one) of `<class>/<image stem>.pt`, each a torch-saved float16 tensor
[2, k, h, w]: [0] the teacher's top-k scores (logits) per map cell, [1] their class indices
(NFNet-F6 at 576 px: k = 5, 18 x 18). They are read without torch (a restricted reader of
torch's zip format, `read_torch_tensor`), joined to the prepared split's records by file
name, and written in record order as OUT/<split>/{scores.npy (float16), indices.npy
(int16), names.npy, info.json}: the pipeline reads row i with record i (memory-mapped, so
OUT should be on a local disk). Every record must have a map; otherwise nothing is written
and the error names the count and the first missing files.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import time
import zipfile
from collections import OrderedDict
from typing import Any, Iterator, Sequence

from absl import flags
import numpy as np

INFO = "info.json"
_DTYPES = {"HalfStorage": np.float16, "FloatStorage": np.float32, "DoubleStorage": np.float64,
           "BFloat16Storage": None, "LongStorage": np.int64, "IntStorage": np.int32,
           "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8}


class TokenLabelError(ValueError):
  """Token-label data that is missing, malformed or does not cover the split."""


# ----------------------------------------------------------------------------- torch files


class _StorageType:
  def __init__(self, name: str):
    self.name = name


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None,
                       *unused) -> np.ndarray:
  del requires_grad, hooks, unused
  itemsize = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride)).copy()


class _Unpickler(pickle.Unpickler):
  """Only the globals a saved tensor needs; anything else is refused (a .pt is a pickle)."""

  def __init__(self, file, storages: dict[str, bytes], where: str):
    super().__init__(file)
    self.storages, self.where = storages, where

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor_v2
    if module == "torch" and name in _DTYPES:
      return _StorageType(name)
    if (module, name) == ("collections", "OrderedDict"):
      return OrderedDict
    raise TokenLabelError(f"{self.where}: holds {module}.{name}, not a plain tensor; a token "
                          "label file is one tensor [2, k, h, w]")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise TokenLabelError(f"{self.where}: unknown storage reference {pid!r}")
    _, kind, key, _, numel = pid
    dtype = _DTYPES.get(getattr(kind, "name", ""))
    if dtype is None:
      raise TokenLabelError(f"{self.where}: unsupported storage type {kind!r}")
    if key not in self.storages:
      raise TokenLabelError(f"{self.where}: storage {key!r} missing from the archive")
    data = np.frombuffer(self.storages[key], dtype=np.dtype(dtype).newbyteorder("<"))
    if data.size < numel:
      raise TokenLabelError(f"{self.where}: storage {key!r} holds {data.size} values, "
                            f"expected {numel}")
    return data


def read_torch_tensor(data: bytes, where: str = "<bytes>") -> np.ndarray:
  """The tensor a `torch.save(tensor, f)` file holds (torch >= 1.6 zip format: an archive
  of `<name>/data.pkl`, whose persistent ids point at raw little-endian storages
  `<name>/data/<key>`), as a numpy array. Needs no torch; refuses anything but a tensor."""
  if not zipfile.is_zipfile(io.BytesIO(data)):
    try:  # torch < 1.6 wrote a different (legacy) layout: let torch read it if installed
      import torch  # type: ignore
    except ImportError:
      raise TokenLabelError(
          f"{where}: not a zip-format torch file (torch >= 1.6 writes those; older torch "
          "wrote a legacy layout that only torch reads: install torch for this prepare "
          "step, or re-save the labels with a recent torch)") from None
    return torch.load(io.BytesIO(data), map_location="cpu").float().numpy()
  with zipfile.ZipFile(io.BytesIO(data)) as z:
    pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
    if len(pkl) != 1:
      raise TokenLabelError(f"{where}: a torch zip file has one */data.pkl, found {len(pkl)}")
    prefix = pkl[0][:-len("data.pkl")]
    storages = {n[len(prefix) + 5:]: z.read(n) for n in z.namelist()
                if n.startswith(prefix + "data/")}
    try:
      out = _Unpickler(io.BytesIO(z.read(pkl[0])), storages, where).load()
    except TokenLabelError:
      raise
    except Exception as e:  # noqa: BLE001  (truncated or corrupt pickle)
      raise TokenLabelError(f"{where}: unreadable torch file ({type(e).__name__}: {e})") from None
  if not isinstance(out, np.ndarray):
    raise TokenLabelError(f"{where}: holds a {type(out).__name__}, not a tensor")
  return out


def check_map(array: np.ndarray, where: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(scores float16 [k, h, w], class indices int16 [k, h, w]) of a [2, k, h, w] map."""
  if array.ndim != 4 or array.shape[0] != 2:
    raise TokenLabelError(f"{where}: shape {list(array.shape)}, expected [2, k, h, w] "
                          "(top-k scores, then their class indices)")
  scores, index = array[0].astype(np.float32), array[1].astype(np.float64)
  if not np.isfinite(scores).all():
    raise TokenLabelError(f"{where}: non-finite scores")
  if (index != np.round(index)).any() or index.min() < 0 or index.max() >= num_classes:
    raise TokenLabelError(f"{where}: class indices must be whole numbers in [0, "
                          f"{num_classes}), found {index.min():g}..{index.max():g}")
  return scores.astype(np.float16), index.astype(np.int16)


# ----------------------------------------------------------------------------- sources


def label_key(name: str) -> str:
  """The join key of a record or label file: `<class>/<stem>` when it has a folder,
  else `<stem>` (the official tfds imagenet2012 names train files without their folder)."""
  parts = name.replace("\\", "/").split("/")
  stem = os.path.splitext(parts[-1])[0]
  return f"{parts[-2]}/{stem}" if len(parts) > 1 and parts[-2] else stem


def _label_files(src: str) -> tuple[dict[str, str], Any]:
  """{key: member} of the .pt files under folder or zip `src`, and a reader(member)."""
  if not os.path.exists(src):
    raise TokenLabelError(f"token labels {src!r} do not exist")
  if os.path.isdir(src):
    members = {}
    for root, dirs, files in os.walk(src, followlinks=True):
      dirs.sort()
      for f in sorted(files):
        if f.endswith(".pt"):
          members[os.path.relpath(os.path.join(root, f), src)] = None
    read = lambda m: open(os.path.join(src, m), "rb").read()
  elif zipfile.is_zipfile(src):
    z = zipfile.ZipFile(src)
    members = {n: None for n in z.namelist() if n.endswith(".pt")}
    read = z.read
  else:
    raise TokenLabelError(f"token labels {src!r}: expected a folder or a .zip of "
                          "<class>/<stem>.pt files")
  keys: dict[str, str] = {}
  for m in members:
    keys[label_key(m)] = m
    stem = os.path.splitext(os.path.basename(m))[0]
    keys[stem] = m if stem not in keys else ""  # "": ambiguous without the folder
  return keys, read


def prepare(src: str, names: Sequence[str], out_dir: str, split: str, num_classes: int,
            dataset: str = "") -> dict[str, Any]:
  """Writes the maps of the records `names` (in record order) to out_dir/split; returns
  the info. Refuses a split the labels do not cover, before writing anything."""
  keys, read = _label_files(src)
  members = [keys.get(label_key(n)) or keys.get(os.path.splitext(os.path.basename(n))[0])
             or None for n in names]
  missing = [n for n, m in zip(names, members) if m is None]
  if missing:
    raise TokenLabelError(
        f"token labels {src!r} do not cover split {split!r}: {len(missing)} of {len(names)} "
        f"images have no <class>/<stem>.pt, e.g. {', '.join(missing[:5])}")
  first = check_map(read_torch_tensor(read(members[0]), members[0]), members[0], num_classes)
  k, h, w = first[0].shape
  final = os.path.join(out_dir, split)
  tmp = final + ".incomplete"
  os.makedirs(tmp, exist_ok=True)
  shape = (len(names), k, h, w)
  scores = np.lib.format.open_memmap(os.path.join(tmp, "scores.npy"), "w+", np.float16, shape)
  index = np.lib.format.open_memmap(os.path.join(tmp, "indices.npy"), "w+", np.int16, shape)
  t0 = time.time()
  for i, m in enumerate(members):
    s, c = check_map(read_torch_tensor(read(m), m), m, num_classes)
    if s.shape != (k, h, w):
      raise TokenLabelError(f"{m}: top-k map {list(s.shape)}, but {members[0]} is "
                            f"{[k, h, w]}: all maps of a split must match")
    scores[i], index[i] = s, c
    if i and i % 50000 == 0:
      print(f"token labels: {i}/{len(members)} ({time.time() - t0:.0f} s)", file=sys.stderr)
  scores.flush()
  index.flush()
  del scores, index
  np.save(os.path.join(tmp, "names.npy"), np.asarray([label_key(n).encode() for n in names]))
  info = dict(num_examples=len(names), k=k, height=h, width=w, num_classes=num_classes,
              dataset=dataset, split=split, source=os.path.abspath(src))
  with open(os.path.join(tmp, INFO), "w") as f:
    json.dump(info, f, indent=1)
  if os.path.exists(final):
    import shutil
    shutil.rmtree(final)
  os.replace(tmp, final)
  return info


class TokenLabelStore:
  """The prepared maps of one split (memory-mapped): `get(i, name)` -> [2, k, h, w] float16
  (scores, class indices), the official layout the transforms and the trainer use."""

  def __init__(self, directory: str, split: str, num_examples: int, num_classes: int):
    self.where = os.path.join(directory, split)
    hint = (f"prepare them with: python -m structvit_jax.data.token_labels --src=LABELS "
            f"--data_dir=DATA_DIR --out={directory} --split={split}")
    if not os.path.exists(os.path.join(self.where, INFO)):
      raise TokenLabelError(f"config.data.token_label_dir={directory!r} asks for token labels "
                            f"but {self.where} holds none ({INFO} missing); {hint}")
    with open(os.path.join(self.where, INFO)) as f:
      self.info = json.load(f)
    if self.info["num_examples"] != num_examples:
      raise TokenLabelError(f"token labels in {self.where} do not cover split {split!r}: "
                            f"prepared for {self.info['num_examples']} images, the split has "
                            f"{num_examples}; {hint}")
    if self.info["num_classes"] != num_classes:
      raise TokenLabelError(f"token labels in {self.where} index {self.info['num_classes']} "
                            f"classes, the dataset has {num_classes}")
    self.scores = self.index = self.names = None  # opened lazily: once per grain worker

  def _open(self) -> None:
    load = lambda f: np.load(os.path.join(self.where, f), mmap_mode="r")
    self.scores, self.index, self.names = load("scores.npy"), load("indices.npy"), load(
        "names.npy")

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "scores": None, "index": None, "names": None}

  def get(self, i: int, name: str) -> np.ndarray:
    if self.scores is None:
      self._open()
    if name and self.names[i].decode() != label_key(name):
      raise TokenLabelError(f"token labels in {self.where}: row {i} is "
                            f"{self.names[i].decode()!r} but record {i} is {name!r}; the data "
                            "was prepared again since: prepare the token labels again")
    return np.stack([self.scores[i], self.index[i].astype(np.float16)])


class WithTokenLabels:
  """A random-access source of records (with `file_name`) plus each one's `token_label`."""

  def __init__(self, source: Any, store: TokenLabelStore):
    self.source, self.store = source, store

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self.source[index])
    name = record.get("file_name", b"")
    name = name.decode() if isinstance(name, bytes) else str(name)
    return {**record, "token_label": self.store.get(int(index), name)}


def warp_map(token_label: np.ndarray, box: Sequence[float], matrix: Sequence[float],
             image_size: tuple[int, int]) -> np.ndarray:
  """The map [2, k, h, w] moved with a geometric RandAugment op on the cropped image.

  `matrix` is the op's PIL affine (a, b, c, d, e, f): output pixel (x, y) samples the input
  at (a x + b y + c, d x + e y + f), in the coordinates of the crop `box` (x0, y0, x1, y1,
  fractions of the map) resized to `image_size` (width, height). The map keeps covering
  the whole image (the box still selects the crop), so the op is conjugated into map cells.
  Nearest cell, as the official `affine_label` (ndimage order 0): scores 0 where the op
  brings in area from outside the cropped image (every class equal after the softmax, as
  for the image's fill), class indices from the nearest cell."""
  a, b, c, d, e, f = matrix
  x0, y0, x1, y1 = (float(t) for t in box)
  _, _, h, w = token_label.shape
  width, height = image_size
  # Map cell coordinates X (cell j spans [j, j + 1)) -> image coordinates u = sx X + ox.
  sx, ox = width / (w * (x1 - x0)), -x0 * width / (x1 - x0)
  sy, oy = height / (h * (y1 - y0)), -y0 * height / (y1 - y0)
  u, v = np.meshgrid(sx * (np.arange(w) + 0.5) + ox, sy * (np.arange(h) + 0.5) + oy)
  su, sv = a * u + b * v + c, d * u + e * v + f  # where the op samples the cropped image
  col = np.floor((su - ox) / sx).astype(np.int64)
  row = np.floor((sv - oy) / sy).astype(np.int64)
  # The image gets the fill outside the crop (RandAugment runs after it): the map's cells
  # there are area the image no longer shows.
  inside = ((col >= 0) & (col < w) & (row >= 0) & (row < h)
            & (su >= 0) & (su < width) & (sv >= 0) & (sv < height))
  out = token_label[:, :, np.clip(row, 0, h - 1), np.clip(col, 0, w - 1)]
  out[0] = np.where(inside, out[0], 0)
  return out


def record_names(source: Any) -> Iterator[str]:
  for i in range(len(source)):
    name = source[i].get("file_name", b"")
    yield name.decode() if isinstance(name, bytes) else str(name)


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str]) -> None:
  del argv
  from structvit_jax.data import builders
  f = flags.FLAGS
  prepared = builders.find_prepared(f.data_dir, f.name)
  if prepared is None:
    raise TokenLabelError(f"no prepared {f.name!r} in --data_dir={f.data_dir!r}: prepare the "
                          "images first (python -m structvit_jax.data.prepare)")
  source, num_classes, _ = builders.open_split(prepared, f.split)
  t0 = time.time()
  info = prepare(f.src, list(record_names(source)), f.out, f.split, num_classes,
                 os.fspath(prepared))
  print(f"token labels: {info['num_examples']} maps of top-{info['k']} x {info['height']} x "
        f"{info['width']} in {os.path.join(f.out, f.split)} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
  from structvit_jax import cli
  flags.DEFINE_string("src", None, "Token labels: a folder or .zip of <class>/<stem>.pt.")
  flags.DEFINE_string("data_dir", None, "tfds data directory holding the prepared images.")
  flags.DEFINE_string("name", "imagenet2012", "tfds name of the prepared images.")
  flags.DEFINE_string("split", "train", "The split the labels are for.")
  flags.DEFINE_string("out", None, "Where to write (config.data.token_label_dir).")
  flags.mark_flags_as_required(["src", "data_dir", "out"])
  cli.run(main, workdir_flag=None)
