"""Kinetics-400, StructViT-S-4-1, 16 frames (dense sampling, rate 4), from IN1K weights.

  python -m structvit_jax.main --config=configs/k400_s.py --workdir=/tmp/k400_s \
      --config.data.data_dir=/data/k400 \
      --config.init_from.checkpoint=/tmp/in1k_s/checkpoints  # 2D->3D inflation: weights issue

Variants: d, stride, kernel_size (M per axis: 3x3x3), aggregation, form, frames
(16 | 32; also sets the test views), e.g. `configs/k400_s.py:d=4,stride=2`.
Expected top-1 (paper, 16x1x4 views = 16 frames, 1 crop, 4 clips): S-4-1 81.4,
S-4-2 81.1, S-8-1 81.6.
"""

from structvit_jax import config_utils

common = config_utils.import_sibling(__file__, "common")


def get_config(arg=None):
  c = common.kinetics_config("s", common.structsa_arg(arg, frames=16))
  return c
