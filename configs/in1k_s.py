"""ImageNet-1K, StructViT-S-4-1 (UniFormer-S with StructSA in stages 3-4), DeiT recipe.

  python -m structvit_jax.main --config=configs/in1k_s.py --workdir=/tmp/in1k_s \
      --config.data.data_dir=/data/tfds

Variants (config string): d (structure dim D; 0 = UniFormer-S), stride, kernel_size (M per
axis), aggregation ('context' | 'element'), implementation ('fused' | 'reference'), e.g.
`configs/in1k_s.py:d=8,stride=1` = StructViT-S-8-1.
Expected top-1 (paper, 224px, 300 epochs): S-4-1 83.2, S-4-2 82.9, S-8-1 83.3,
UniFormer-S (d=0) 82.9.
"""

from structvit_jax import config_utils

base = config_utils.import_sibling(__file__, "base")

SIZE = "s"                   # preset family: structvit_{s,b,l}_4_1 / uniformer_{s,b,l}
DROP_PATH = {"s": 0.1, "b": 0.3, "l": 0.4}


def get_config(arg=None):
  a = config_utils.parse_arg(arg, d=4, stride=1, kernel_size=3, aggregation="context",
                             implementation="fused")
  return imagenet_config(SIZE, a)


def imagenet_config(size: str, a):
  c = base.get_base_config()
  c.model.name = f"uniformer_{size}" if a.d == 0 else f"structvit_{size}_4_1"
  c.model.kwargs.num_classes = 1000
  c.model.kwargs.drop_path_rate = DROP_PATH[size]
  c.model.kwargs.d = a.d
  c.model.kwargs.stride = a.stride
  c.model.kwargs.kernel_size = a.kernel_size
  c.model.kwargs.aggregation = a.aggregation
  c.model.kwargs.implementation = a.implementation

  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.num_workers = 8
  # DeiT augmentation (applied in the input pipeline); mixup/cutmix run on device.
  c.data.crop_scale = (0.08, 1.0)
  c.data.random_flip = True
  c.data.randaugment = "rand-m9-mstd0.5-inc1"  # DeiT's --aa (timm); "" = off
  c.data.random_erase = 0.25
  c.data.eval_crop_ratio = 0.875    # resize to size / 0.875, centre crop

  # DeiT recipe (paper section 4.1): AdamW, lr 1e-3 at batch 1024, wd 0.05, cosine,
  # 300 epochs with 5 warm-up, label smoothing 0.1, mixup 0.8, cutmix 1.0.
  c.batch_size = 1024
  c.num_epochs = 300.0
  c.warmup_epochs = 5.0
  c.lr = 1e-3
  c.lr_base_batch_size = 1024
  c.weight_decay = 0.05
  c.label_smoothing = 0.1
  c.mixup_alpha = 0.8
  c.cutmix_alpha = 1.0
  c.eval_every_epochs = 5.0
  return c
