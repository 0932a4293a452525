"""ImageNet-1K, StructViT-S-4-1 (UniFormer-S with StructSA in stages 3-4), DeiT recipe.

  python -m structvit_jax.main --config=configs/in1k_s.py --workdir=/tmp/in1k_s \
      --config.data.data_dir=/data/tfds

Variants (config string): d (structure dim D; 0 = UniFormer-S), stride, kernel_size (M per
axis), aggregation ('context' | 'element'), form ('fused' | 'reference'), e.g.
`configs/in1k_s.py:d=8,stride=1` = StructViT-S-8-1.
Expected top-1 (paper, 224px, 300 epochs): S-4-1 83.2, S-4-2 82.9, S-8-1 83.3,
UniFormer-S (d=0) 82.9.

`res=384` fine-tunes a 224 run at 384 with UniFormer's official 384 recipe
(common.imagenet_finetune), from --config.init_from.checkpoint=<224 workdir, export or
.pth>. Expected (UniFormer's 384 rows, from token-labeling checkpoints): UniFormer-S (d=0) 84.6.

`tl=True`: token labeling (docs/token_labeling.md) as the official uniformer_small TL run
(head_dim 32, aux head, MixToken, lr 1.6e-3, EMA; add --config.data.token_label_dir=DIR);
expected: UniFormer-S (d=0) 83.4 (official UniFormer repository). `tl=True,res=384`
fine-tunes such a TL run at 384: the same model (so its checkpoint loads), no token labels.
"""

from structvit_jax import config_utils

common = config_utils.import_sibling(__file__, "common")


def get_config(arg=None):
  a = common.structsa_arg(arg, res=224, tl=False)
  c = common.imagenet_config()
  common.structvit_model(c, "s", a, 1000, common.IMAGENET_DROP_PATH["s"])
  if a.tl:
    common.token_labeling(c, "s")
  if a.res != 224:
    common.imagenet_finetune(c, "s", a.res)
  return c
