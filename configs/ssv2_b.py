"""Something-Something V2, StructViT-B-4-1, 32 frames (TSN segment sampling), from K400.

  python -m structvit_jax.main --config=configs/ssv2_b.py --workdir=/tmp/ssv2_b \
      --config.data.data_dir=/data/ssv2 --config.init_from.checkpoint=/tmp/k400_b/checkpoints

Variants: d, stride, kernel_size, aggregation, form, frames. Drop path 0.4.
Expected top-1 (paper, 3 crops x 1 clip): B-4-1 71.5.
"""

from structvit_jax import config_utils

common = config_utils.import_sibling(__file__, "common")


def get_config(arg=None):
  c = common.segment_config("b", common.structsa_arg(arg, frames=32), name="ssv2",
                            num_classes=174)
  c.remat = True
  return c
