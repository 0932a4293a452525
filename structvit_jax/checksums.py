"""End-to-end checksums of a checkpoint step (README.md, "Faults on resume").

What a step stores is checked as the trainer sees it, not as bytes on a disk:

- every array by a 64-bit fingerprint of its values, computed from the state that is saved
  and again from the state a restore returns (`fingerprints`). The fingerprint is of the
  global array: a sum over its words, so each process adds up the shards it holds (on the
  host, in numpy: nothing to compile) and the processes add their sums together. It does
  not depend on the sharding, the number of processes or the storage (local disk, gs://),
  and every process ends with the same numbers, so all of them agree on a mismatch;
- every process's data-iterator file by a digest of its exact bytes (`text_digest`),
  computed from the iterator state when saving and from the file when restoring.

The digests go into the step as one more Orbax item (`checksums/metadata`, JSON), written in
the same commit as the state: a step either has its checksums or was never committed. A
damaged file that Orbax still reads changes an array's values (a fingerprint mismatch) or
fails the read (an exception); either makes the step unusable.

Fingerprint of an array with words x_i (its bytes as uint32, i the global word index): two
32-bit lanes, sum_i x_i * m_i with m_i odd (any one changed word changes the sum) and
sum_i fmix32(x_i ^ k_i) (murmur3's finaliser: a nonlinear lane for several changed words),
both mod 2^32. The order of a sum does not matter mod 2^32, so every split into shards gives
the same result. It finds accidents (bit rot, torn or mixed-up files), not an attacker.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

VERSION = 1
ITEM = "checksums"          # the Orbax item of a step: <step>/checksums/metadata
EXPORT_FILE = "checksums.json"  # an export's: <export>/checksums.json


def leaf_name(path) -> str:
  def name(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return "/".join(name(k) for k in path)


def _words(x: np.ndarray) -> np.ndarray:
  """The array's bytes as uint32 words (same shape; 8-byte types get a trailing axis of 2)."""
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    return x.astype(np.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return x.view(np.uint32)
  if size == 8:
    return x.view(np.uint32).reshape(*x.shape, 2)
  small = {2: np.uint16, 1: np.uint8}[size]
  return x.view(small).astype(np.uint32)


_CHUNK_WORDS = 1 << 16  # words per numpy pass: the temporaries stay in the CPU's cache


def _lanes(w: np.ndarray, idx: np.ndarray) -> tuple[int, int]:
  """The two lanes' sums (not yet mod 2^32) over words `w` with global indices `idx`."""
  with np.errstate(over="ignore"):
    m = idx * np.uint32(0x9E3779B9)
    m |= np.uint32(1)
    m *= w
    a = int(m.sum(dtype=np.uint64))
    h = idx * np.uint32(0x85EBCA6B)
    h += np.uint32(0x27D4EB2F)
    h ^= w
    h ^= h >> 16
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> 13
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> 16
    b = int(h.sum(dtype=np.uint64))
  return a, b


def _partial(w: np.ndarray, start: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
  """The two lanes' sums mod 2^32 over the words `w` of a block at `start` of an array of
  words of global `shape`, a few rows at a time."""
  if w.ndim == 0:
    w, start, shape = w.reshape(1), (0,), (1,)
  strides = [int(np.prod(shape[d + 1:], dtype=np.int64)) for d in range(len(shape))]
  # The index of each word within its row (axes 1..), the same for every row of the block.
  rest = np.zeros((), np.uint32)
  for axis in range(1, w.ndim):
    pos = (np.arange(w.shape[axis], dtype=np.uint64) + start[axis]) * strides[axis]
    view = [1] * (w.ndim - 1)
    view[axis - 1] = w.shape[axis]
    rest = rest + (pos % 2**32).astype(np.uint32).reshape(view)
  rest = np.ascontiguousarray(np.broadcast_to(rest, w.shape[1:]))
  rows = max(1, _CHUNK_WORDS // max(1, rest.size))
  a = b = 0
  for r0 in range(0, w.shape[0], rows):
    block = w[r0:r0 + rows]
    first = (np.arange(r0, r0 + block.shape[0], dtype=np.uint64) + start[0]) * strides[0]
    with np.errstate(over="ignore"):
      idx = (first % 2**32).astype(np.uint32).reshape((-1,) + (1,) * (w.ndim - 1)) + rest
    da, db = _lanes(block, idx)
    a, b = a + da, b + db
  return np.array([a % 2**32, b % 2**32], np.uint64)


def _blocks(x: Any) -> list[tuple[np.ndarray, tuple[int, ...]]]:
  """(host copy, start) of each block of `x` this process adds in: the whole of a numpy
  array; of a jax.Array, its addressable shards with replica_id 0 (each element of the
  global array is in exactly one such shard on exactly one process)."""
  if not isinstance(x, jax.Array):
    x = np.asarray(x)
    return [(x, (0,) * x.ndim)]
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  out = []
  for shard in x.addressable_shards:
    if shard.replica_id != 0:
      continue
    start = tuple(0 if s.start is None else s.start for s in shard.index) if shard.index \
        else ()
    out.append((shard.data, start))
  return out


def _fingerprint_local(x: Any) -> np.ndarray:
  total = np.zeros(2, np.uint64)
  shape = tuple(x.shape)
  for data, start in _blocks(x):
    w = _words(np.asarray(data))
    wshape = shape + w.shape[len(shape):]
    total += _partial(w, start + (0,) * (w.ndim - len(start)), wshape)
  return total % 2**32


def fingerprints(tree: Any) -> dict[str, str]:
  """{'a/b/c': 16 hex digits} for every array leaf of `tree` (jax or numpy arrays). Each
  process sums over the blocks it holds, on the host (no compile); with several processes
  the sums are added up across them (a collective: every process must call it)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [leaf_name(p) for p, _ in flat]
  leaves = [x for _, x in flat]
  if not leaves:
    return {}
  from concurrent.futures import ThreadPoolExecutor
  # numpy releases the GIL in its loops: a few threads share the arrays.
  with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
    sums = np.stack(list(pool.map(_fingerprint_local, leaves)))
  if jax.process_count() > 1 and any(isinstance(x, jax.Array) and not x.is_fully_addressable
                                     for x in leaves):
    from jax.experimental import multihost_utils
    every = np.asarray(multihost_utils.process_allgather(sums.astype(np.uint32)))
    sums = every.astype(np.uint64).sum(axis=0) % 2**32
  return {n: f"{int(a):08x}{int(b):08x}" for n, (a, b) in zip(names, sums)}


def text_digest(text: str | bytes) -> str:
  if isinstance(text, str):
    text = text.encode()
  return hashlib.blake2b(text, digest_size=16).hexdigest()


def record(arrays: dict[str, str], data_iter: dict[str, str] | None = None) -> dict:
  return {"version": VERSION, "arrays": arrays, "data_iter": data_iter or {}}


class Mismatch(Exception):
  """What does not match its checksum: the message names the array or file."""


def check_arrays(expected: dict[str, str], tree: Any, what: str = "array") -> None:
  """Raises Mismatch naming the first array of `tree` whose fingerprint differs from
  `expected` (or has none there)."""
  found = fingerprints(tree)
  for name in found:  # tree order: params come first
    if name not in expected:
      raise Mismatch(f"{what} {name} has no checksum")
    if found[name] != expected[name]:
      raise Mismatch(f"{what} {name} does not match its checksum (stored "
                     f"{expected[name]}, read {found[name]})")


def parse(text: str | bytes) -> dict:
  """A checksums record; raises Mismatch when it is not one (a damaged file)."""
  try:
    rec = json.loads(text)
    if (not isinstance(rec, dict) or rec.get("version") != VERSION
        or not isinstance(rec.get("arrays"), dict)):
      raise ValueError("not a checksums record")
  except ValueError as e:
    raise Mismatch(f"its checksums file does not read ({e})") from None
  return rec


def check_export(export_dir: str, tree: Any) -> bool:
  """Checks an export's arrays against its checksums.json: True when verified, False for an
  export written before checksums were kept; raises Mismatch naming the array."""
  from structvit_jax import paths
  path = f"{export_dir.rstrip('/')}/{EXPORT_FILE}"
  if not paths.exists(path):
    return False
  try:
    text = paths.read_text(path)
  except Exception as e:  # noqa: BLE001
    raise Mismatch(f"its checksums file does not read ({type(e).__name__}: {e})") from None
  check_arrays(parse(text)["arrays"], tree)
  return True
