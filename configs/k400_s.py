"""Kinetics-400, StructViT-S-4-1, 16 frames (dense sampling, rate 4), from IN1K weights.

  python -m structvit_jax.main --config=configs/k400_s.py --workdir=/tmp/k400_s \
      --config.data.data_dir=/data/k400 \
      --config.init_from.checkpoint=/tmp/in1k_s/checkpoints  # 2D->3D inflation: weights issue

Variants: d, stride, kernel_size (M per axis: 3x3x3), aggregation, implementation, frames
(16 | 32; also sets the test views), e.g. `configs/k400_s.py:d=4,stride=2`.
Expected top-1 (paper, 16x1x4 views = 16 frames, 1 crop, 4 clips): S-4-1 81.4,
S-4-2 81.1, S-8-1 81.6.
"""

from structvit_jax import config_utils

base = config_utils.import_sibling(__file__, "base")

VIDEO_DROP_PATH = {"s": 0.1, "b": 0.3}  # paper: 0.1 (S); B as UniFormer-B's K400 recipe


def get_config(arg=None):
  a = config_utils.parse_arg(arg, d=4, stride=1, kernel_size=3, aggregation="context",
                             implementation="fused", frames=16)
  return kinetics_config("s", a)


def video_model(c, size: str, a, num_classes: int, drop_path: float) -> None:
  c.model.name = f"uniformer_{size}" if a.d == 0 else f"structvit_{size}_4_1"
  c.model.kwargs.num_classes = num_classes
  c.model.kwargs.drop_path_rate = drop_path
  c.model.kwargs.d = a.d
  c.model.kwargs.stride = a.stride
  c.model.kwargs.kernel_size = a.kernel_size
  c.model.kwargs.aggregation = a.aggregation
  c.model.kwargs.implementation = a.implementation


def kinetics_config(size: str, a):
  c = base.get_base_config()
  video_model(c, size, a, num_classes=400, drop_path=VIDEO_DROP_PATH[size])

  # IN1K image weights (or a K400 run for the segment recipes): 2D kernels averaged over
  # time as the official inflate_weight, new classifier.
  c.init_from.inflate = "average"
  c.init_from.drop_head = True
  c.data.name = "kinetics400"
  # DATA_DIR/<videos> + list files `relative/path.mp4 label` (UniFormer/mmaction format),
  # relative to data_dir (README, "Video datasets").
  c.data.train_list = "train.csv"
  c.data.eval_list = "val.csv"
  c.data.image_size = 224
  c.data.num_frames = a.frames
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.num_workers = 8
  c.data.sampling = "dense"        # N frames at sampling_rate from a random window
  c.data.sampling_rate = 4
  c.data.scale_jitter = (256, 320)  # short side, then a random 224 crop
  c.data.random_flip = True
  c.data.randaugment = "rand-m7-n4-mstd0.5-inc1"
  c.data.random_erase = 0.25
  c.data.test_clips = 4            # 16x1x4: 4 clips x 1 crop, scores averaged
  c.data.test_crops = 1

  # Paper section 4.1: AdamW, batch 64, lr 2e-4, wd 0.05, 110 epochs incl. 10 warm-up.
  c.batch_size = 64
  c.lr = 2e-4
  c.lr_base_batch_size = 64
  c.weight_decay = 0.05
  c.num_epochs = 110.0
  c.warmup_epochs = 10.0
  c.label_smoothing = 0.1
  c.mixup_alpha = 0.8
  c.cutmix_alpha = 1.0
  c.eval_every_epochs = 5.0
  return c
