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


# TEMPORARY, branch wt-b only: the data fields the data side reads as attributes, with the
# defaults of the `data.get(key, default)` calls they replaced. Delete once configs/base.py
# declares them (engineer A's change); until then every in-process config gets them.
_DATA_FIELDS = dict(generator_seed=0, train_examples=4096, eval_examples=1024,
                    random_flip=True, crop_scale=(0.08, 1.0), randaugment="",
                    random_erase=0.0, eval_crop_ratio=0.875, mean_per_class=False,
                    sampling="dense", sampling_rate=1, scale_jitter=(), test_clips=1,
                    test_crops=1, num_classes=0, mean=(0.45,) * 3, std=(0.225,) * 3,
                    train_list="", eval_list="")


def _declare_data_fields() -> None:
  from structvit_jax import config_utils
  base = config_utils.import_sibling(
      os.path.join(os.path.dirname(__file__), "..", "configs", "base.py"), "base")
  get_base_config = base.get_base_config

  def patched():
    c = get_base_config()
    for k, v in _DATA_FIELDS.items():
      if k not in c.data:
        c.data[k] = v
    return c
  base.get_base_config = patched


_declare_data_fields()
