"""Test set-up: 8 simulated CPU devices (before any JAX backend use) and parsed absl flags
(grain workers read flags); see docs/platform_notes.md, "Tests"."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles(request):
  """XLA's cheap compile mode (as flax's model tests) for test modules that set
  `FAST_COMPILES = True`: there, compiles of tiny models dominate the time."""
  if not getattr(request.module, "FAST_COMPILES", False):
    yield
    return
  import jax
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)



@pytest.fixture(scope="session", autouse=True)
def _compilation_cache_in_tmp(tmp_path_factory):
  """The trainer's CLI (main.py) turns on a persistent compilation cache, by default under
  ~/.cache: the tests' trainer subprocesses use one in the session's temporary directory
  instead ($JAX_COMPILATION_CACHE_DIR, which config.compilation_cache_dir='auto' follows).
  jax is imported first so that this process's own settings stay as they were."""
  import jax  # noqa: F401  (jax reads JAX_* variables once, at import)
  key = "JAX_COMPILATION_CACHE_DIR"
  previous = os.environ.get(key)
  if previous is None:
    os.environ[key] = str(tmp_path_factory.mktemp("jax_compilation_cache"))
  yield
  if previous is None:
    os.environ.pop(key, None)
