"""Kinetics-400, TimeSformer ViT-B/16, 8 frames at 224 (dense sampling, rate 32), the
official recipe (TimeSformer_divST_8x32_224.yaml), from 2-D ViT-B/16 weights.

  python -m structvit_jax.main --config=configs/k400_timesformer.py \
      --workdir=/tmp/k400_timesformer --config.data.data_dir=/data/k400 \
      --config.init_from.checkpoint=/tmp/vit_b16  # 2-D ViT-B/16 (IN-21K), weights issue

Variant: attention (divided_space_time | joint_space_time | space_only |
sparse_local_global | axial), e.g. `configs/k400_timesformer.py:attention=joint_space_time`.
Expected top-1 (paper, 8x224, 1 clip x 3 crops): divided 78.0 (Table 1: space-only 76.9,
joint 77.4, L+G 75.9, axial 73.5).

Batch: the official TRAIN.BATCH_SIZE 8 is the global batch (SlowFast loaders divide it by
NUM_GPUS: 1 clip per GPU on 8 GPUs), and SOLVER.BASE_LR 0.005 is used as is, so lr 0.005
is set at lr_base_batch_size 8; a larger --config.batch_size scales it linearly.
"""

from structvit_jax import config_utils

common = config_utils.import_sibling(__file__, "common")


def get_config(arg=None):
  a = config_utils.parse_arg(arg, attention="divided_space_time")
  return common.timesformer_config(a, name="kinetics400", num_classes=400)
