"""Defaults shared by every recipe: recipes import this and override fields.

Durations are in epochs (converted to steps by the trainer from the dataset size and the
global batch size), so overriding --config.batch_size on the command line never leaves a
stale step count behind.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Model: structvit_jax.models.get_model(c.model.name, **c.model.kwargs). kwargs override
  # the preset's fields; StructSA models take `structsa` (StructSAConfig's fields, any
  # subset: configs/common.py structvit_model).
  c.model = ml_collections.ConfigDict()
  c.model.name = "structvit_s_4_1"
  c.model.kwargs = ml_collections.ConfigDict()

  # Data: structvit_jax.data.create_input(c, split=..., ...).
  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic_image"
  c.data.data_dir = ""
  c.data.tfds_name = ""            # tfds data: directory name under data_dir ("": c.data.name)
  c.data.image_size = 224
  c.data.num_frames = 0            # 0: images; >0: clips of this many frames
  c.data.num_workers = 0           # grain worker processes (0: in-process)
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.num_classes = 0           # 0: the dataset's own class count (FineGym: 99 or 288)
  c.data.mean_per_class = False    # eval metric: mean per-class top-1 (FineGym's)
  # Augmentation (train split).
  c.data.random_flip = True        # horizontal flip
  c.data.crop_scale = (0.08, 1.0)  # images: random-resized-crop area range
  c.data.randaugment = ""          # timm RandAugment string, e.g. "rand-m9-mstd0.5-inc1"; "": off
  c.data.random_erase = 0.0        # random-erasing probability; 0: off
  c.data.eval_crop_ratio = 0.875   # images, eval: resize to size / ratio, centre crop
  c.data.token_label_dir = ""      # images: prepared token labels (data/token_labels.py); set: TL
  c.data.token_labels = False      # the recipe needs token labels (an unset dir is an error)
  # Videos: list files `relative/path.mp4 label` in data_dir, sampling and test views.
  c.data.train_list = ""           # "": <train_split>.csv
  c.data.eval_list = ""            # "": <eval_split>.csv
  c.data.sampling = "dense"        # 'dense' (frames at sampling_rate) | 'segment' (TSN)
  c.data.sampling_rate = 1         # dense sampling stride in frames
  c.data.scale_jitter = ()         # train: short side in [lo, hi], random crop; (): no jitter
  c.data.mean = (0.45, 0.45, 0.45)  # clip normalisation (images: ImageNet's)
  c.data.std = (0.225, 0.225, 0.225)
  c.data.test_clips = 1            # eval views: clips x crops, scores averaged
  c.data.test_crops = 1
  # Synthetic datasets (synthetic_image, synthetic_video).
  c.data.train_examples = 4096
  c.data.eval_examples = 1024
  c.data.generator_seed = 0        # the dataset itself; c.seed drives training

  # Optimisation (DeiT recipe by default).
  c.batch_size = 1024              # global, over all processes and devices
  c.num_epochs = 300.0
  c.warmup_epochs = 5.0
  c.optimizer = "adamw"            # 'adamw' | 'sgd'
  c.lr = 1e-3                      # at batch size c.lr_base_batch_size
  c.lr_base_batch_size = 1024      # lr scales linearly: lr * batch_size / lr_base_batch_size
  c.min_lr = 1e-5
  c.warmup_lr = 1e-6
  c.schedule = "cosine"            # 'cosine' | 'steps'
  c.lr_step_epochs = ()            # for 'steps': epochs at which lr *= lr_step_factor
  c.lr_step_factor = 0.1
  c.momentum = 0.9                 # sgd
  c.weight_decay = 0.05
  # Which leaves weight decay applies to (optim.decay_mask): 'no_pos_embed' (rank > 1 except
  # position encodings and tokens), 'timm' (the official UniFormer/DeiT trainers: rank > 1
  # except top-level pos_embed/cls_token) or 'all' (TimeSformer's). Recipes set the official.
  c.weight_decay_mask = "no_pos_embed"
  c.grad_clip_norm = 0.0           # 0: off
  c.label_smoothing = 0.1
  c.mixup_alpha = 0.8              # 0: off
  c.cutmix_alpha = 1.0             # 0: off
  c.mixup_switch_prob = 0.5
  # Token labeling (on when data.token_label_dir is set; token_label_loss.py): loss weights of
  # the class head and the per-token aux head, MixToken, the official ground-truth blend.
  c.token_label = ml_collections.ConfigDict(
      dict(cls_weight=1.0, dense_weight=1.0, mix_token=True, ground_truth=False))
  c.ema_decay = 0.0                # 0: no EMA of params
  c.grad_accum_steps = 1
  c.dtype = "float32"              # compute dtype: 'float32' | 'bfloat16' (params stay fp32)
  c.remat = False                  # per-block rematerialisation
  c.fsdp = False                   # shard params and optimiser state over the 'data' axis

  # Loop, evaluation, checkpoints, logging.
  c.eval_every_epochs = 1.0
  c.eval_batch_size = 0            # global eval batch; 0: same as batch_size
  c.eval_only = False              # evaluate the newest checkpoint in workdir (or c.resume)
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.log_every_steps = 50
  c.transfer_guard = "disallow"    # implicit transfers in the step dispatch: allow/log/disallow
  # Persistent XLA compilation cache (structvit_jax/compile_cache.py): 'auto' is
  # $JAX_COMPILATION_CACHE_DIR or ~/.cache/structvit_jax/jax; a path; '' turns it off.
  c.compilation_cache_dir = "auto"
  c.resume = ""                    # a checkpoint dir to resume from (after workdir's own)
  c.init_from = ml_collections.ConfigDict()  # pretrained init (weights issue)
  c.init_from.checkpoint = ""      # training checkpoint dir, export dir or official .pth
  c.init_from.inflate = ""         # 2D -> 3D conv kernels: 'average' (official) | 'centre'
  c.init_from.drop_head = False    # re-initialise head / aux_head (another class count)
  c.num_train_steps = -1           # >0 overrides num_epochs (smoke runs)

  # Multi-host: jax.distributed.initialize() when enabled (auto-detects TPU pods / SLURM;
  # explicit coordinator for anything else).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  c.distributed.local_device_ids = ""  # e.g. "0,1"
  return c
