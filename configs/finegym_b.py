"""FineGym (Gym288 or Gym99), StructViT-B-4-1, 16 frames (TSN segment sampling), from K400.

  python -m structvit_jax.main --config=configs/finegym_b.py:classes=288 \
      --workdir=/tmp/gym288_b --config.data.data_dir=/data/finegym \
      --config.init_from.checkpoint=/tmp/k400_b/checkpoints

Variants: classes (288 | 99: picks the label set and list files), d, stride, kernel_size,
aggregation, form, frames.
Metric: mean per-class top-1. Expected (paper): B-4-1 Gym288 54.2, Gym99 89.5.
"""

from structvit_jax import config_utils

common = config_utils.import_sibling(__file__, "common")


def get_config(arg=None):
  a = common.structsa_arg(arg, classes=288, frames=16)
  if a.classes not in (99, 288):
    raise ValueError(f"finegym_b: classes must be 99 or 288, got {a.classes}")
  c = common.segment_config("b", a, name="finegym", num_classes=a.classes)
  c.data.train_split = f"gym{a.classes}_train"
  c.data.eval_split = f"gym{a.classes}_val"
  c.data.train_list = f"gym{a.classes}_train.csv"
  c.data.eval_list = f"gym{a.classes}_val.csv"
  c.data.num_classes = a.classes
  c.data.mean_per_class = True     # report mean per-class top-1 (FineGym's metric)
  c.remat = True
  return c
