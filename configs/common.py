"""Recipe logic shared by configs/*.py. Every recipe builds on configs/base.py through these
functions (recipes import base and this helper, never another recipe). No JAX here, so
loading a config stays fast.
"""

import ml_collections

from structvit_jax import config_utils

base = config_utils.import_sibling(__file__, "base")

# Config-string keys of the StructViT recipes, named as StructSAConfig's fields.
STRUCTSA_ARGS = dict(d=4, stride=1, kernel_size=3, aggregation="context", form="fused")
IMAGENET_DROP_PATH = {"s": 0.1, "b": 0.3, "l": 0.4}
VIDEO_DROP_PATH = {"s": 0.1, "b": 0.3}    # paper: 0.1 (S); B as UniFormer-B's K400 recipe
SEGMENT_DROP_PATH = {"s": 0.3, "b": 0.4}  # UniFormer's SSv2 recipe
# As structvit_jax.models.timesformer.ATTENTION_TYPES (kept here: configs import no JAX).
ATTENTION_TYPES = ("divided_space_time", "joint_space_time", "space_only",
                   "sparse_local_global", "axial")


def structsa_arg(arg, **extra) -> ml_collections.ConfigDict:
  """The config string of a StructViT recipe: STRUCTSA_ARGS plus the recipe's own keys."""
  return config_utils.parse_arg(arg, **STRUCTSA_ARGS, **extra)


def structvit_model(c, size: str, a, num_classes: int, drop_path: float) -> None:
  """UniFormer-{size} (D = 0) or StructViT-{size}. The name is the preset the variant starts
  from; `structsa` records the variant itself (D, S, M, aggregation, form), so config.json
  and exports of e.g. in1k_s.py:d=8,stride=2 describe and rebuild that model."""
  c.model.name = f"uniformer_{size}" if a.d == 0 else f"structvit_{size}_4_1"
  c.model.kwargs.num_classes = num_classes
  c.model.kwargs.drop_path_rate = drop_path
  c.model.kwargs.structsa = ml_collections.ConfigDict({k: a[k] for k in STRUCTSA_ARGS})


def imagenet_config() -> ml_collections.ConfigDict:
  """ImageNet-1K with DeiT's augmentation and recipe (paper section 4.1); the model is the
  recipe's."""
  c = base.get_base_config()
  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.data.num_workers = 8
  # DeiT augmentation (applied in the input pipeline); mixup/cutmix run on device.
  c.data.crop_scale = (0.08, 1.0)
  c.data.random_flip = True
  c.data.randaugment = "rand-m9-mstd0.5-inc1"  # DeiT's --aa (timm)
  c.data.random_erase = 0.25
  c.data.eval_crop_ratio = 0.875    # resize to size / 0.875, centre crop

  # AdamW, lr 1e-3 at batch 1024, wd 0.05, cosine, 300 epochs with 5 warm-up, label
  # smoothing 0.1, mixup 0.8, cutmix 1.0.
  c.batch_size = 1024
  c.num_epochs = 300.0
  c.warmup_epochs = 5.0
  c.lr = 1e-3
  c.lr_base_batch_size = 1024
  c.weight_decay = 0.05
  c.weight_decay_mask = "timm"    # timm create_optimizer: position-encoding convs decayed too
  c.label_smoothing = 0.1
  c.mixup_alpha = 0.8
  c.cutmix_alpha = 1.0
  c.eval_every_epochs = 5.0
  return c


# Large-resolution fine-tuning (UniFormer's token_labeling/exp/uniformer_*_tl_384/run.sh):
# global batch (64 or 32 per GPU x 8) and drop path per size. L's script names the wrong
# model (uniformer_small_plus) but was edited for L otherwise: batch 32, drop path 0.3.
FINETUNE_BATCH = {"s": 512, "b": 512, "l": 256}
FINETUNE_DROP_PATH = {"s": 0.1, "b": 0.3, "l": 0.3}


def imagenet_finetune(c, size: str, res: int) -> None:
  """Fine-tunes a 224 ImageNet model at `res` (the paper's 384 rows), given the 224 weights
  as --config.init_from.checkpoint (a workdir, an export or an official .pth). The official
  recipe: 50 epochs plus timm's 10 cool-down epochs, i.e. 60 epochs at a constant lr 5e-6
  (lr = min_lr), no warm-up, weight decay 1e-8, no EMA, no mixup/cutmix (the TL trainer's
  defaults: its runs mix by MixToken inside the token-labeling model); evaluation at `res`
  with timm's crop 0.9 (the TL model's default_cfg crop_pct). UniFormer has no absolute
  position embedding, so the 224 weights load unchanged (docs/official_weights.md,
  "Recipes")."""
  c.model.kwargs.drop_path_rate = FINETUNE_DROP_PATH[size]
  c.data.image_size = res
  c.data.eval_crop_ratio = 0.9
  c.batch_size = FINETUNE_BATCH[size]
  c.lr_base_batch_size = FINETUNE_BATCH[size]
  c.lr = 5e-6
  c.min_lr = 5e-6
  c.num_epochs = 60.0
  c.warmup_epochs = 0.0
  c.weight_decay = 1e-8
  c.mixup_alpha = 0.0
  c.cutmix_alpha = 0.0
  c.ema_decay = 0.0
  c.init_from.drop_head = False     # the same 1000 classes
  c.data.token_labels = False       # a TL model (tl=True) is fine-tuned without dense targets


# The official UniFormer token-labeling runs (exp/*_tl_224/run.sh and main.py's defaults):
# lr 1.6e-3 (S, B) / 1.2e-3 (L) at batch 8 x 128, no lr scaling, no mixup or CutMix (MixToken
# instead), model EMA 0.99992; the rest as the DeiT recipe. docs/token_labeling.md.
TOKEN_LABEL_LR = {"s": 1.6e-3, "b": 1.6e-3, "l": 1.2e-3}


def token_labeling(c, size: str) -> None:
  """The token-labeling recipe on top of imagenet_config() and structvit_model(): the aux
  head, head_dim 32 for S and B (the official uniformer_small / uniformer_base TL models),
  the official hyper-parameters; training needs --config.data.token_label_dir."""
  c.data.token_labels = True
  c.model.kwargs.token_labeling = True
  if size in ("s", "b"):
    c.model.kwargs.head_dim = 32
  c.lr = TOKEN_LABEL_LR[size]
  c.lr_base_batch_size = 1024
  c.mixup_alpha = 0.0
  c.cutmix_alpha = 0.0
  c.ema_decay = 0.99992


def kinetics_config(size: str, a, num_classes: int = 400,
                    drop_path: float | None = None) -> ml_collections.ConfigDict:
  """Kinetics-400 (paper section 4.1), StructViT-{size} of variant `a`, from IN1K weights."""
  c = base.get_base_config()
  structvit_model(c, size, a, num_classes,
                  VIDEO_DROP_PATH[size] if drop_path is None else drop_path)
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
  c.data.num_workers = 8
  c.data.sampling = "dense"        # N frames at sampling_rate from a random window
  c.data.sampling_rate = 4
  c.data.scale_jitter = (256, 320)  # short side, then a random 224 crop
  c.data.random_flip = True
  c.data.randaugment = "rand-m7-n4-mstd0.5-inc1"
  c.data.random_erase = 0.25
  c.data.test_clips = 4            # 16x1x4: 4 clips x 1 crop, scores averaged
  c.data.test_crops = 1

  # AdamW, batch 64, lr 2e-4, wd 0.05, 110 epochs incl. 10 warm-up.
  c.batch_size = 64
  c.lr = 2e-4
  c.lr_base_batch_size = 64
  c.weight_decay = 0.05
  c.weight_decay_mask = "timm"    # SlowFast construct_optimizer + ZERO_WD_1D_PARAM: the same
  c.num_epochs = 110.0
  c.warmup_epochs = 10.0
  c.label_smoothing = 0.1
  c.mixup_alpha = 0.8
  c.cutmix_alpha = 1.0
  c.eval_every_epochs = 5.0
  return c


def segment_config(size: str, a, name: str, num_classes: int) -> ml_collections.ConfigDict:
  """Paper section 4.1 for SSv1/V2, Diving-48, FineGym: segment-based (TSN) sampling, no
  flip, init from K400, 60 epochs incl. 5 warm-up, the rest as K400."""
  c = kinetics_config(size, a, num_classes, SEGMENT_DROP_PATH[size])
  c.data.name = name
  c.data.sampling = "segment"      # one frame per segment (random in train, centre in test)
  c.data.sampling_rate = 0         # unused by segment sampling
  c.data.random_flip = False       # left/right matter in the labels
  c.data.test_clips = 1            # 3 crops x 1 clip
  c.data.test_crops = 3
  c.num_epochs = 60.0
  c.warmup_epochs = 5.0
  return c


def timesformer_config(a, name: str, num_classes: int) -> ml_collections.ConfigDict:
  """TimeSformer ViT-B/16, 8x224, the official K400 solver (k400_timesformer.py)."""
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
  c.weight_decay_mask = "all"     # TimeSformer's construct_optimizer exempts only BN: none here
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
