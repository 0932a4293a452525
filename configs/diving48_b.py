"""Diving-48, StructViT-B-4-1, 16 frames (TSN segment sampling), from K400.

  python -m structvit_jax.main --config=configs/diving48_b.py --workdir=/tmp/diving48_b \
      --config.data.data_dir=/data/diving48 --config.init_from.checkpoint=/tmp/k400_b/checkpoints

Variants: d, stride, kernel_size, aggregation, implementation, frames.
Expected top-1 (paper): B-4-1 88.3.
"""

from structvit_jax import config_utils

ssv2_s = config_utils.import_sibling(__file__, "ssv2_s")


def get_config(arg=None):
  a = config_utils.parse_arg(arg, d=4, stride=1, kernel_size=3, aggregation="context",
                             implementation="fused", frames=16)
  c = ssv2_s.segment_config("b", a, name="diving48", num_classes=48,
                            drop_path=ssv2_s.SSV2_DROP_PATH["b"])
  c.remat = True
  return c
