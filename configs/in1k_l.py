"""ImageNet-1K, StructViT-L-4-1 (UniFormer-L with layer scale; drop path 0.4).

  python -m structvit_jax.main --config=configs/in1k_l.py --workdir=/tmp/in1k_l \
      --config.data.data_dir=/data/tfds

Variants as in1k_s.py (d, stride, kernel_size, aggregation, form).
Expected top-1 (paper): 86.0 for StructViT-L-4-1 and 85.6 for UniFormer-L, both trained with
token labeling (the paper's "stronger setup"). Token-labeling targets are not part of this
recipe (the model keeps its aux head and the TL evaluation rule), so a plain DeiT-recipe run
is expected to land below those numbers.

`res=384` fine-tunes a 224 run at 384 with UniFormer's official 384 recipe
(common.imagenet_finetune), from --config.init_from.checkpoint=<224 workdir, export or
.pth>. Expected (UniFormer's 384 rows, from token-labeling checkpoints): UniFormer-L (d=0) 86.3.
"""

from structvit_jax import config_utils

common = config_utils.import_sibling(__file__, "common")


def get_config(arg=None):
  a = common.structsa_arg(arg, res=224)
  c = common.imagenet_config()
  common.structvit_model(c, "l", a, 1000, common.IMAGENET_DROP_PATH["l"])
  if a.res != 224:
    common.imagenet_finetune(c, "l", a.res)
  return c
