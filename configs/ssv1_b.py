"""Something-Something V1, StructViT-B-4-1, 32 frames (TSN segment sampling), from K400.

  python -m structvit_jax.main --config=configs/ssv1_b.py --workdir=/tmp/ssv1_b \
      --config.data.data_dir=/data/ssv1 --config.init_from.checkpoint=/tmp/k400_b/checkpoints

Data as configs/ssv1_s.py; the recipe is ssv2_b.py's (32 frames, drop path 0.4, remat) on
SSv1's 174 classes.
Variants: d, stride, kernel_size, aggregation, form, frames.
Expected top-1 (3 crops x 1 clip): B-4-1 61.3 (the paper's SSv1 result as Papers with Code
lists it; the 32 frames are ssv2_b.py's, the paper's Table 5a gives the frame count).
"""

from structvit_jax import config_utils

common = config_utils.import_sibling(__file__, "common")


def get_config(arg=None):
  c = common.segment_config("b", common.structsa_arg(arg, frames=32), name="ssv1",
                            num_classes=174)
  c.remat = True
  return c
