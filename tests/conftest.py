"""Test set-up: 8 simulated CPU devices (before any JAX backend use) and parsed absl flags
(grain workers read flags); see docs/platform_notes.md, "Tests"."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

# The files that take longest in CI (seconds of a 2-worker run), longest first. pytest-xdist
# (--dist loadfile --no-loadscope-reorder, pyproject.toml) hands files to its two workers in
# collection order, so starting with these keeps one worker from running a 4-minute file
# alone at the end while the other idles. Files not listed follow in their usual order.
LONGEST_FIRST = (
    "test_train.py", "test_token_labeling.py", "test_demo.py", "test_notebooks.py",
    "test_convert.py", "test_models.py", "test_benchmarks.py", "test_gpu_report.py",
    "test_video_data.py", "test_ssv1.py", "test_table1.py",
    "test_compile_cache.py", "test_export.py", "test_serving_export.py", "test_faults.py", "test_checksums.py",
    "test_configs.py", "test_gcs.py",
    "test_recipe_fidelity.py", "test_structsa.py", "test_device_input.py", "test_viz.py",
    "test_perf_plumbing.py",
)


def pytest_collection_modifyitems(items: list) -> None:
  """Collection order = scheduling order under xdist: the LONGEST_FIRST files first."""
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep theirs


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
