"""Something-Something V2, StructViT-S-4-1, 16 frames (TSN segment sampling), from K400.

  python -m structvit_jax.main --config=configs/ssv2_s.py --workdir=/tmp/ssv2_s \
      --config.data.data_dir=/data/ssv2 --config.init_from.checkpoint=/tmp/k400_s/checkpoints

Variants: d, stride, kernel_size, aggregation, form, frames.
Expected top-1 (paper, 16x3x1 views = 16 frames, 3 crops, 1 clip): S-4-1 68.8.
"""

from structvit_jax import config_utils

common = config_utils.import_sibling(__file__, "common")


def get_config(arg=None):
  c = common.segment_config("s", common.structsa_arg(arg, frames=16), name="ssv2",
                            num_classes=174)
  return c
