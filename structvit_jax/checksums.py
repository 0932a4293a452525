"""End-to-end checksums of a checkpoint step (README.md, "Faults on resume").

What a step stores is checked as the trainer sees it, not as bytes on a disk:

- every array by a 64-bit fingerprint of its values, computed on the devices from the state
  that is saved, and again from the state a restore returns (`fingerprints`). The fingerprint
  is of the global array, so it does not depend on the sharding, the number of processes or
  the storage (local disk, gs://): every process computes the same numbers for a restored
  state (it is one jitted reduction over the global arrays), so all of them agree on a
  mismatch without a further exchange;
- every process's data-iterator file by a digest of its exact bytes (`text_digest`),
  computed from the iterator state when saving and from the file when restoring.

The digests go into the step as one more Orbax item (`checksums/metadata`, JSON), written in
the same commit as the state: a step either has its checksums or was never committed. A
damaged file that Orbax still reads changes an array's values (a fingerprint mismatch) or
fails the read (an exception); either makes the step unusable.

Fingerprint of an array with words x_i (its bytes as uint32, i the global word index): two
32-bit lanes, sum_i x_i * m_i with m_i odd (any one changed word changes the sum) and
sum_i fmix32(x_i ^ k_i) (murmur3's finaliser: a nonlinear lane for several changed words),
both mod 2^32. The order of a sum does not matter mod 2^32, so every sharding gives the same
result. It finds accidents (bit rot, torn or mixed-up files), not an attacker.
"""

from __future__ import annotations

import hashlib
import json
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


def _words(x: jax.Array) -> jax.Array:
  """The array's bytes as uint32 words (same shape; 8-byte types get a trailing axis of 2)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
  small = {2: jnp.uint16, 1: jnp.uint8}[size]
  return jax.lax.bitcast_convert_type(x, small).astype(jnp.uint32)


def _fmix32(h: jax.Array) -> jax.Array:
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _fingerprint(x: jax.Array) -> jax.Array:
  w = _words(x)
  # The global index of every word from per-axis iotas (no reshape: keeps the sharding).
  idx = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(w.ndim)):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(
        stride & 0xFFFFFFFF)
    stride *= w.shape[axis]
  m = (idx * jnp.uint32(0x9E3779B9)) | jnp.uint32(1)
  a = jnp.sum(w * m, dtype=jnp.uint32)
  b = jnp.sum(_fmix32(w ^ (idx * jnp.uint32(0x85EBCA6B) + jnp.uint32(0x27D4EB2F))),
              dtype=jnp.uint32)
  return jnp.stack([a, b])


@jax.jit
def _fingerprints(leaves: list[jax.Array]) -> jax.Array:
  if not leaves:
    return jnp.zeros((0, 2), jnp.uint32)
  return jnp.stack([_fingerprint(x) for x in leaves])


def fingerprints(tree: Any) -> dict[str, str]:
  """{'a/b/c': 16 hex digits} for every array leaf of `tree` (jax or numpy arrays; a
  collective when the arrays span several processes)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [leaf_name(p) for p, _ in flat]
  leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in flat]
  out = _fingerprints(leaves)
  if not out.is_fully_addressable:
    out = out.addressable_shards[0].data  # replicated: every process has all of it
  values = np.asarray(jax.device_get(out))
  return {n: f"{int(a):08x}{int(b):08x}" for n, (a, b) in zip(names, values)}


def text_digest(text: str | bytes) -> str:
  if isinstance(text, str):
    text = text.encode()
  return hashlib.blake2b(text, digest_size=16).hexdigest()


def data_iter_text(data_iter: Any) -> str:
  """The exact text grain's checkpoint handler writes for `data_iter` (grain.checkpoint)."""
  from grain._src.python.dataset import dataset
  if isinstance(data_iter, dataset.DatasetIterator):
    return json.dumps(data_iter.get_state(), indent=4)
  return data_iter.get_state().decode()


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


def write_export(export_dir: str, tree: Any) -> None:
  """<export>/checksums.json: the fingerprints of an export's arrays (inference.save_export)."""
  from structvit_jax import paths
  paths.write_atomic(f"{export_dir.rstrip('/')}/{EXPORT_FILE}",
                     json.dumps(record(fingerprints(tree)), indent=1))


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
