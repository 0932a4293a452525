"""Kinetics-400, StructViT-B-4-1, 32 frames (dense sampling, rate 4), from IN1K weights.

  python -m structvit_jax.main --config=configs/k400_b.py --workdir=/tmp/k400_b \
      --config.data.data_dir=/data/k400 --config.init_from.checkpoint=/tmp/in1k_b/checkpoints

Variants as k400_s.py (d, stride, kernel_size, aggregation, form, frames), e.g.
`configs/k400_b.py:d=4,stride=2`. Drop path 0.3, remat on (memory).
Expected top-1 (paper, 32x1x4 views): B-4-1 83.3, B-4-2 83.1.
"""

from structvit_jax import config_utils

common = config_utils.import_sibling(__file__, "common")


def get_config(arg=None):
  c = common.kinetics_config("b", common.structsa_arg(arg, frames=32))
  c.remat = True
  return c
