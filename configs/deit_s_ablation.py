"""DeiT-S with StructSA (the paper's Table 1 ablations) on ImageNet-1K, DeiT recipe.

  python -m structvit_jax.main --config=configs/deit_s_ablation.py:d=4,m=3,aggregation=context \
      --workdir=/tmp/deit_s_d4 --config.data.data_dir=/data/tfds

Variants: d (structure dim D; 0 = plain self-attention, d=1 with context = ConvSA),
m (kernel window M x M), aggregation ('context' | 'element').
Expected IN1K top-1 (paper Table 1): D = 0/1/2/4/8 -> 80.5/80.8/80.9/81.1/81.3;
M = 1/3/5/7 (D=4) -> 80.6/81.1/81.1/81.0; element 80.9, context 81.1.
"""

import ml_collections

from structvit_jax import config_utils

common = config_utils.import_sibling(__file__, "common")


def get_config(arg=None):
  a = config_utils.parse_arg(arg, d=4, m=3, aggregation="context")
  c = common.imagenet_config()
  c.model.name = "deit_s"
  c.model.kwargs.num_classes = 1000
  c.model.kwargs.drop_path_rate = 0.1
  c.model.kwargs.structsa = ml_collections.ConfigDict(
      dict(d=a.d, kernel_size=a.m, aggregation=a.aggregation))
  return c
