"""Run paths: local directories and Cloud Storage URLs (gs://bucket/path) through one API.

Every read and write of a workdir, an init_from source or an export goes through here (and
Orbax, which takes the same URLs: TensorStore writes the arrays, etils.epath the rest).
Remote paths go through `etils.epath` (gcsfs for gs://); local paths keep the plain os calls
they always used. What GCS does differently (docs/platform_notes.md, "Cloud Storage"):

- There are no directories: a prefix "exists" once an object lies under it, so `makedirs`
  does nothing there.
- An object upload is all or nothing: a reader sees the old object or the new one. That is
  the atomicity `write_atomic` gives local files with a temporary file and a rename.
- There is no append (gcsfs's open('a') silently overwrites): `append_text` rewrites the
  whole object.
- A rename copies every object and deletes the source: it is not atomic, so it is used only
  to move a damaged checkpoint aside, never as a lock.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterator

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """True for a URL (gs://bucket/path); False for a local path."""
  return "://" in os.fspath(path)


def epath(path: PathLike) -> Any:
  """The etils.epath.Path of `path` (imported on first use: the local fast paths and the
  command lines' error handling do not need it)."""
  from etils import epath as epath_lib
  return epath_lib.Path(path)


def abspath(path: PathLike) -> str:
  """os.path.abspath for local paths; a URL is already absolute."""
  return os.fspath(path) if is_remote(path) else os.path.abspath(path)


def forget_listings(path: PathLike) -> None:
  """gcsfs caches directory listings for the life of the process: forget them, so that what
  other processes wrote since (the other hosts, a trainer that a notebook watches) is seen."""
  if is_remote(path):
    from etils.epath import backend
    backend.fsspec_backend.fs(os.fspath(path)).invalidate_cache()


def exists(path: PathLike) -> bool:
  return epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: PathLike) -> bool:
  """On GCS: a prefix with at least one object under it."""
  return epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: PathLike) -> bool:
  return epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path: PathLike) -> list[str]:
  return ([p.name for p in epath(path).iterdir()] if is_remote(path)
          else os.listdir(path))


def walk(top: PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
  """os.walk: (directory, subdirectory names, file names)."""
  if not is_remote(top):
    yield from os.walk(top)
    return
  scheme = os.fspath(top).split("://", 1)[0] + "://"
  for root, dirs, files in epath(top).walk():
    root = os.fspath(root)  # gcsfs may give 'bucket/dir' without the scheme: put it back
    yield (root if "://" in root else scheme + root.lstrip("/")), list(dirs), list(files)


def makedirs(path: PathLike) -> None:
  """mkdir -p; nothing to do on GCS (a prefix exists once an object is written under it)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def read_text(path: PathLike) -> str:
  if is_remote(path):
    return epath(path).read_text()
  with open(path) as f:
    return f.read()


def write_text(path: PathLike, text: str) -> None:
  """A plain write (a remote object appears whole or not at all)."""
  if is_remote(path):
    epath(path).write_text(text)
  else:
    with open(path, "w") as f:
      f.write(text)


def write_bytes(path: PathLike, data: bytes) -> None:
  """A plain binary write (a remote object appears whole or not at all)."""
  if is_remote(path):
    epath(path).write_bytes(data)
  else:
    with open(path, "wb") as f:
      f.write(data)


class WriteError(OSError):
  """A run file that could not be written (disk full, permissions); names path and cause."""


def write_atomic(path: PathLike, text: str) -> None:
  """Writes `text` so that a reader (or a run killed half-way, or a full disk) sees the old
  file or the new one, never a truncated one: locally through a temporary file in the same
  directory, fsync and a rename; on GCS one object upload (all or nothing). Raises
  WriteError naming the path."""
  try:
    if is_remote(path):
      epath(path).write_text(text)
    else:
      _write_local_atomic(os.fspath(path), text)
  except OSError as e:
    raise WriteError(e.errno, f"cannot write {path}: {e.strerror or e}") from e


def _write_local_atomic(path: str, text: str) -> None:
  tmp = None
  try:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    tmp = None
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)


def append_text(path: PathLike, text: str) -> None:
  """Appends `text`: locally in place; on GCS, objects cannot be appended to, so the whole
  object is read and rewritten (fine for small logs)."""
  if is_remote(path):
    p = epath(path)
    p.write_text((p.read_text() if p.exists() else "") + text)
  else:
    with open(path, "a") as f:
      f.write(text)


def rename(src: PathLike, dst: PathLike) -> None:
  """Renames a file or directory; on GCS every object is copied and the source deleted."""
  if is_remote(src):
    epath(src).rename(dst)
  else:
    os.rename(src, dst)


def remove(path: PathLike) -> None:
  if is_remote(path):
    epath(path).unlink()
  else:
    os.remove(path)


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Copies one file (either side local or remote), replacing dst."""
  epath(src).copy(dst, overwrite=True)
