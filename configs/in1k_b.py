"""ImageNet-1K, StructViT-B-4-1, DeiT recipe (as configs/in1k_s.py; drop path 0.3).

  python -m structvit_jax.main --config=configs/in1k_b.py --workdir=/tmp/in1k_b \
      --config.data.data_dir=/data/tfds

Variants as in1k_s.py (d, stride, kernel_size, aggregation, form), e.g.
`configs/in1k_b.py:d=4,stride=2` = StructViT-B-4-2.
Expected top-1 (paper, 224px): B-4-1 84.2, B-4-2 84.0, B-8-1 84.3, UniFormer-B (d=0) 83.8.

`res=384` fine-tunes a 224 run at 384 with UniFormer's official 384 recipe
(common.imagenet_finetune), from --config.init_from.checkpoint=<224 workdir, export or
.pth>. Expected (UniFormer's 384 rows, from token-labeling checkpoints): UniFormer-B (d=0) 86.0.

`tl=True`: token labeling as the official uniformer_base TL run (head_dim 32, aux head,
MixToken, lr 1.6e-3, EMA; add --config.data.token_label_dir=DIR); expected: UniFormer-B
(d=0) 85.1 (official UniFormer repository). `tl=True,res=384` fine-tunes such a TL run at
384: the same model (so its checkpoint loads), no token labels.
"""

from structvit_jax import config_utils

common = config_utils.import_sibling(__file__, "common")


def get_config(arg=None):
  a = common.structsa_arg(arg, res=224, tl=False)
  c = common.imagenet_config()
  common.structvit_model(c, "b", a, 1000, common.IMAGENET_DROP_PATH["b"])
  if a.tl:
    common.token_labeling(c, "b")
  if a.res != 224:
    common.imagenet_finetune(c, "b", a.res)
  return c
