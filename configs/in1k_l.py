"""ImageNet-1K, StructViT-L-4-1 (UniFormer-L with layer scale; drop path 0.4), token labeling.

  python -m structvit_jax.data.token_labels --src=label_top5_train_nfnet \
      --data_dir=/data/tfds --out=/data/token_labels        # once (docs/token_labeling.md)
  python -m structvit_jax.main --config=configs/in1k_l.py --workdir=/tmp/in1k_l \
      --config.data.data_dir=/data/tfds --config.data.token_label_dir=/data/token_labels

Variants as in1k_s.py (d, stride, kernel_size, aggregation, form), plus `tl` (default True).
Expected top-1 (paper): 86.0 for StructViT-L-4-1 and 85.6 for UniFormer-L (d=0), both
trained with token labeling (the paper's "stronger setup"): the teacher's dense score maps
(NFNet-F6, distributed by the token-labeling authors) supervise the aux head per token,
with MixToken, as the official uniformer_large_ls TL run (lr 1.2e-3 at batch 1024, no
mixup / CutMix, EMA 0.99992). Training stops at once, naming the prepare command, if
data.token_label_dir is not set. `tl=False`: the same model with the DeiT recipe and no
token labels (expected below those numbers; no paper figure).

`res=384` fine-tunes a 224 run at 384 with UniFormer's official 384 recipe
(common.imagenet_finetune), from --config.init_from.checkpoint=<224 workdir, export or
.pth>; with `tl` (the default) the model is the token-labeling one (its aux head), so a TL
checkpoint loads, and the fine-tune itself uses no token labels. Expected (UniFormer's 384
rows, from token-labeling checkpoints): UniFormer-L (d=0) 86.3.
"""

from structvit_jax import config_utils

common = config_utils.import_sibling(__file__, "common")


def get_config(arg=None):
  a = common.structsa_arg(arg, res=224, tl=True)
  c = common.imagenet_config()
  common.structvit_model(c, "l", a, 1000, common.IMAGENET_DROP_PATH["l"])
  if a.tl:
    common.token_labeling(c, "l")
  if a.res != 224:
    common.imagenet_finetune(c, "l", a.res)
  return c
