"""Something-Something V2, TimeSformer ViT-B/16, 8 frames at 224 (TSN segment sampling),
the official recipe (TimeSformer_divST_8_224.yaml), from 2-D ViT-B/16 weights.

  python -m structvit_jax.main --config=configs/ssv2_timesformer.py \
      --workdir=/tmp/ssv2_timesformer --config.data.data_dir=/data/ssv2 \
      --config.init_from.checkpoint=/tmp/vit_b16  # 2-D ViT-B/16 (IN-21K), weights issue

Variant: attention (divided_space_time | joint_space_time | space_only |
sparse_local_global | axial), e.g. `configs/ssv2_timesformer.py:attention=axial`.
Expected top-1 (paper, 8x224, 1 clip x 3 crops): divided 59.5 (Table 1: space-only 36.6,
joint 58.5, L+G 56.3, axial 56.2). The solver is the K400 one (k400_timesformer.py).
"""

from structvit_jax import config_utils

common = config_utils.import_sibling(__file__, "common")


def get_config(arg=None):
  a = config_utils.parse_arg(arg, attention="divided_space_time")
  c = common.timesformer_config(a, name="ssv2", num_classes=174)
  c.data.sampling = "segment"      # one frame per segment (random in train, centre in test)
  c.data.sampling_rate = 0         # unused by segment sampling
  c.data.random_flip = False       # left/right matter in the labels
  return c
