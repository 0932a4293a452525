"""Something-Something V2, StructViT-S-4-1, 16 frames (TSN segment sampling), from K400.

  python -m structvit_jax.main --config=configs/ssv2_s.py --workdir=/tmp/ssv2_s \
      --config.data.data_dir=/data/ssv2 --config.init_from.checkpoint=/tmp/k400_s/checkpoints

Variants: d, stride, kernel_size, aggregation, implementation, frames.
Expected top-1 (paper, 16x3x1 views = 16 frames, 3 crops, 1 clip): S-4-1 68.8.
"""

from structvit_jax import config_utils

k400_s = config_utils.import_sibling(__file__, "k400_s")

SSV2_DROP_PATH = {"s": 0.3, "b": 0.4}  # UniFormer's SSv2 recipe


def get_config(arg=None):
  a = config_utils.parse_arg(arg, d=4, stride=1, kernel_size=3, aggregation="context",
                             implementation="fused", frames=16)
  return segment_config("s", a, name="ssv2", num_classes=174, drop_path=SSV2_DROP_PATH["s"])


def segment_config(size: str, a, name: str, num_classes: int, drop_path: float):
  """Paper section 4.1 for SSv1/V2, Diving-48, FineGym: segment-based (TSN) sampling, no
  flip, init from K400, 60 epochs incl. 5 warm-up, the rest as K400."""
  c = k400_s.kinetics_config(size, a)
  k400_s.video_model(c, size, a, num_classes=num_classes, drop_path=drop_path)
  c.data.name = name
  c.data.sampling = "segment"      # one frame per segment (random in train, centre in test)
  c.data.sampling_rate = 0         # unused by segment sampling
  c.data.random_flip = False       # left/right matter in the labels
  c.data.test_clips = 1            # 3 crops x 1 clip
  c.data.test_crops = 3
  c.num_epochs = 60.0
  c.warmup_epochs = 5.0
  return c
