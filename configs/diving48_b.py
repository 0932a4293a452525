"""Diving-48, StructViT-B-4-1, 16 frames (TSN segment sampling), from K400.

  python -m structvit_jax.main --config=configs/diving48_b.py --workdir=/tmp/diving48_b \
      --config.data.data_dir=/data/diving48 --config.init_from.checkpoint=/tmp/k400_b/checkpoints

Variants: d, stride, kernel_size, aggregation, form, frames.
Expected top-1 (paper): B-4-1 88.3.
"""

from structvit_jax import config_utils

common = config_utils.import_sibling(__file__, "common")


def get_config(arg=None):
  c = common.segment_config("b", common.structsa_arg(arg, frames=16), name="diving48",
                            num_classes=48)
  c.remat = True
  return c
