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

