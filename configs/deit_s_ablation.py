"""DeiT-S with StructSA (the paper's Table 1 ablations): ImageNet-1K with the DeiT recipe, or
with `video=True` Something-Something V1 (Table 1's video column).

  python -m structvit_jax.main --config=configs/deit_s_ablation.py:d=4,m=3,aggregation=context \
      --workdir=/tmp/deit_s_d4 --config.data.data_dir=/data/tfds
  python -m structvit_jax.main --config=configs/deit_s_ablation.py:video=True,d=4,m=3 \
      --workdir=/tmp/deit_s_ssv1_d4 --config.data.data_dir=/data/ssv1 \
      --config.init_from.checkpoint=/tmp/deit_s_d0/checkpoints

Variants: d (structure dim D; 0 = plain self-attention, d=1 with context = ConvSA),
m (kernel window M x M; on clips M x M x M), aggregation ('context' | 'element');
video (SSv1 instead of IN-1K), frames (16), tubelet (the tubelet depth of the patch
embedding, `temporal_patch_size`; 1 = frame by frame, so no convolution sees motion before
attention).
Video mode, as the paper's Table 1: 16 frames (TSN segment sampling), fine-tuned from an
IN-1K DeiT-S (--config.init_from.checkpoint: a workdir, an export or an official DeiT .pth;
the patch embedding and position table are inflated to the clip, the head re-initialised)
with "random cropping only": short side 256, a random 224 crop; no flip, RandAugment,
mixup / CutMix or random erasing. The rest is the SSv1/SSv2 solver (configs/common.py
segment_config: AdamW, batch 64, lr 2e-4, 60 epochs incl. 5 warm-up, label smoothing 0.1;
eval 1 clip x 3 crops); drop path DeiT-S's 0.1.
Expected top-1 (paper Table 1): IN1K D = 0/1/2/4/8 -> 80.5/80.8/80.9/81.1/81.3;
M = 1/3/5/7 (D=4) -> 80.6/81.1/81.1/81.0; element 80.9, context 81.1. SSv1: the paper's
Table 1 SSv1 column (not transcribed here).
"""

import ml_collections

from structvit_jax import config_utils

common = config_utils.import_sibling(__file__, "common")

VIDEO_DEFAULTS = dict(frames=16, tubelet=1)


def get_config(arg=None):
  a = config_utils.parse_arg(arg, d=4, m=3, aggregation="context", video=False,
                             **VIDEO_DEFAULTS)
  structsa = ml_collections.ConfigDict(dict(d=a.d, kernel_size=a.m, aggregation=a.aggregation))
  if not a.video:
    if any(a[k] != v for k, v in VIDEO_DEFAULTS.items()):
      raise ValueError(f"config string: {', '.join(VIDEO_DEFAULTS)} need video=True")
    c = common.imagenet_config()
    c.model.name = "deit_s"
    c.model.kwargs.num_classes = 1000
    c.model.kwargs.drop_path_rate = 0.1
    c.model.kwargs.structsa = structsa
    return c
  if a.frames <= 0 or a.tubelet <= 0 or a.frames % a.tubelet:
    raise ValueError(f"config string: frames={a.frames} must be a positive multiple of "
                     f"tubelet={a.tubelet}")
  # The SSv1 data and solver of the StructViT recipes (configs/ssv1_s.py) ...
  c = common.segment_config("s", ml_collections.ConfigDict(
      dict(common.STRUCTSA_ARGS, d=a.d, kernel_size=a.m, aggregation=a.aggregation,
           frames=a.frames)), name="ssv1", num_classes=174)
  # ... with DeiT-S from IN-1K weights (inflated to the clip; new 174-class head) ...
  c.model.name = "deit_s"
  c.model.kwargs = ml_collections.ConfigDict(dict(
      num_classes=174, drop_path_rate=0.1, temporal_patch_size=a.tubelet, structsa=structsa))
  c.remat = True  # 16 x 196 tokens per clip
  # ... and random cropping as the only augmentation.
  c.data.scale_jitter = (256, 256)  # short side 256 (no scale jitter), random 224 crop
  c.data.random_flip = False
  c.data.randaugment = ""
  c.data.random_erase = 0.0
  c.mixup_alpha = 0.0
  c.cutmix_alpha = 0.0
  return c
