"""The persistent XLA compilation cache: a restart of the same config compiles nothing.

`setup(config.compilation_cache_dir)` at start-up (main.py), before the first compile:
  'auto' (default)  $JAX_COMPILATION_CACHE_DIR if set, else
                    $XDG_CACHE_HOME/structvit_jax/jax (~/.cache/structvit_jax/jax)
  a path            that directory (a gs:// path works too: JAX reads it through etils.epath;
                    multi-host jobs need a directory every host sees, since only process 0
                    writes entries)
  ''                off
Every program is cached (no minimum compile time or size), so a restart reads even the small
ones. Several processes may share the directory: each entry is one file written once per
key, and process 0 alone writes in a multi-process job; an entry read while another process
writes it fails to decompress, which JAX turns into a warning and a compile.

`counts()` says how many XLA programs this process needed and how many of them came from
the cache, from JAX's monitoring events (a restart that compiled nothing: programs == hits).
"""

from __future__ import annotations

import os
import threading

import jax
from jax import monitoring

_PROGRAM_EVENT = "/jax/core/compile/backend_compile_duration"  # compiles and cache reads
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_lock = threading.Lock()
_counts = {"programs": 0, "hits": 0}
_listening = False


def default_dir() -> str:
  """The 'auto' directory: JAX's own setting if the environment gives one, else a per-user
  cache directory."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "structvit_jax", "jax")


def resolve(setting: str) -> str:
  """The directory `setting` names ('' when off)."""
  if setting == "auto":
    return default_dir()
  if not setting or "://" in setting:
    return setting
  return os.path.abspath(os.path.expanduser(setting))


def setup(setting: str) -> str:
  """Points JAX's persistent cache at `setting` (see the module docstring) or turns it off;
  returns the directory ('' when off). Call before the first compile of the process."""
  path = resolve(setting)
  _listen()
  if not path:
    jax.config.update("jax_enable_compilation_cache", False)
    return ""
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  # Cache every program unless the user tuned the thresholds: the small ones (init, the
  # metrics' reductions) add up on a restart too.
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return path


def _listen() -> None:
  global _listening
  with _lock:
    if _listening:
      return
    _listening = True

  def on_duration(event: str, duration: float, **kwargs) -> None:
    if event == _PROGRAM_EVENT:
      with _lock:
        _counts["programs"] += 1

  def on_event(event: str, **kwargs) -> None:
    if event == _HIT_EVENT:
      with _lock:
        _counts["hits"] += 1

  monitoring.register_event_duration_secs_listener(on_duration)
  monitoring.register_event_listener(on_event)


def counts() -> dict[str, int]:
  """{'programs': XLA programs this process needed since setup(), 'hits': how many of them
  were read from the persistent cache (the rest were compiled)}."""
  with _lock:
    return dict(_counts)
