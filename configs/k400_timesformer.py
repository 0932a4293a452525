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

base = config_utils.import_sibling(__file__, "base")

# As structvit_jax.models.timesformer.ATTENTION_TYPES (kept here: configs import no JAX).
ATTENTION_TYPES = ("divided_space_time", "joint_space_time", "space_only",
                   "sparse_local_global", "axial")


def get_config(arg=None):
  a = config_utils.parse_arg(arg, attention="divided_space_time")
  return timesformer_config(a, name="kinetics400", num_classes=400)


def timesformer_config(a, name: str, num_classes: int):
  if a.attention not in ATTENTION_TYPES:
    raise ValueError(f"config string: attention={a.attention!r}; valid: "
                     f"{', '.join(ATTENTION_TYPES)}")
  c = base.get_base_config()
  c.model.name = "timesformer_b"
  c.model.kwargs.num_classes = num_classes
  c.model.kwargs.attention_type = a.attention
  c.model.kwargs.drop_path_rate = 0.1  # the official VisionTransformer default
  c.init_from.drop_head = True         # 2-D ViT (or K400) head -> num_classes

  c.data.name = name
  c.data.train_list = "train.csv"  # list files in data_dir (README, "Video datasets")
  c.data.eval_list = "val.csv"
  c.data.image_size = 224
  c.data.num_frames = 8
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.num_workers = 8
  c.data.sampling = "dense"        # 8 frames at sampling_rate from a random window
  c.data.sampling_rate = 32
  c.data.scale_jitter = (256, 320)  # short side, then a random 224 crop
  c.data.random_flip = True
  c.data.randaugment = ""          # none
  c.data.random_erase = 0.0
  c.data.mean = (0.45, 0.45, 0.45)  # DATA.MEAN / DATA.STD (the pipeline's video default)
  c.data.std = (0.225, 0.225, 0.225)
  c.data.test_clips = 1            # 1 clip x 3 crops, scores averaged
  c.data.test_crops = 3

  # SOLVER: sgd, momentum 0.9, wd 1e-4, steps_with_relative_lrs [0, 11, 14] x [1, .1, .01],
  # 15 epochs, no warm-up; plain cross-entropy (no mixup / cutmix / label smoothing).
  c.batch_size = 8
  c.optimizer = "sgd"
  c.lr = 0.005
  c.lr_base_batch_size = 8
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.schedule = "steps"
  c.lr_step_epochs = (11.0, 14.0)
  c.lr_step_factor = 0.1
  c.num_epochs = 15.0
  c.warmup_epochs = 0.0
  c.label_smoothing = 0.0
  c.mixup_alpha = 0.0
  c.cutmix_alpha = 0.0
  c.eval_every_epochs = 5.0        # TRAIN.EVAL_PERIOD
  return c
