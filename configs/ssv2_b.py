"""Something-Something V2, StructViT-B-4-1, 32 frames (TSN segment sampling), from K400.

  python -m structvit_jax.main --config=configs/ssv2_b.py --workdir=/tmp/ssv2_b \
      --config.data.data_dir=/data/ssv2 --config.init_from.checkpoint=/tmp/k400_b/checkpoints

Variants: d, stride, kernel_size, aggregation, implementation, frames. Drop path 0.4.
Expected top-1 (paper, 3 crops x 1 clip): B-4-1 71.5.
"""

from structvit_jax import config_utils

ssv2_s = config_utils.import_sibling(__file__, "ssv2_s")


def get_config(arg=None):
  a = config_utils.parse_arg(arg, d=4, stride=1, kernel_size=3, aggregation="context",
                             implementation="fused", frames=32)
  c = ssv2_s.segment_config("b", a, name="ssv2", num_classes=174,
                            drop_path=ssv2_s.SSV2_DROP_PATH["b"])
  c.remat = True
  return c
