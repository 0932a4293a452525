"""The persistent compilation cache (structvit_jax/compile_cache.py): where it goes, off, and
a second identical run of the trainer that compiles nothing."""

import os
import re
import subprocess
import sys

import jax
import pytest

from structvit_jax import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = re.compile(r"Compilation cache (\S+): (\d+) XLA programs, (\d+) read from the cache, "
                    r"(\d+) compiled")


def test_resolve(monkeypatch, tmp_path):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.resolve("auto") == str(tmp_path / "xdg" / "structvit_jax" / "jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert compile_cache.resolve("auto") == str(tmp_path / "home/.cache/structvit_jax/jax")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))  # JAX's own wins
  assert compile_cache.resolve("auto") == str(tmp_path / "jax")
  assert compile_cache.resolve("~/c") == str(tmp_path / "home" / "c")
  assert compile_cache.resolve("gs://bucket/c") == "gs://bucket/c"
  assert compile_cache.resolve("") == ""


def test_setup_sets_and_turns_off(monkeypatch, tmp_path):
  keys = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
          "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  before = {k: getattr(jax.config, k) for k in keys}
  for k in ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
    monkeypatch.delenv(k, raising=False)
  try:
    assert compile_cache.setup(str(tmp_path / "c")) == str(tmp_path / "c")
    assert jax.config.jax_enable_compilation_cache
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
    assert compile_cache.setup("") == ""
    assert not jax.config.jax_enable_compilation_cache
  finally:
    for k, v in before.items():
      jax.config.update(k, v)


def _run(workdir, cache, env) -> tuple[str, int, int, int]:
  cmd = [sys.executable, "-m", "structvit_jax.main",
         "--config=configs/demo.py:train_examples=32", f"--workdir={workdir}",
         "--config.batch_size=16", "--config.data.eval_examples=16",
         "--config.num_train_steps=2", "--config.log_every_steps=1",
         f"--config.compilation_cache_dir={cache}"]
  r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  m = COUNTS.search(r.stderr)
  assert m, r.stderr[-4000:]
  return m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))


def test_second_identical_run_compiles_nothing(tmp_path):
  """Run 1 on an empty cache compiles every program and writes them; run 2 (a restart in a
  new process, same config, new workdir) reads every program from the cache, compiles none
  and adds no entry. No cache hit in run 1 also shows that no program is compiled twice
  (the train step compiled ahead of its first call, the eval step's compile on a thread)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  env.pop("XLA_FLAGS", None)  # one device
  cache = tmp_path / "cache"
  where, programs, hits, compiled = _run(tmp_path / "run1", cache, env)
  assert where == str(cache)
  assert programs > 0 and hits == 0 and compiled == programs
  entries = sorted(os.listdir(cache))
  assert len(entries) >= programs  # every program written (no minimum time or size)
  _, programs2, hits2, compiled2 = _run(tmp_path / "run2", cache, env)
  assert compiled2 == 0 and hits2 == programs2 == programs
  assert sorted(os.listdir(cache)) == entries
