"""The demo: a tiny StructViT on the built-in synthetic_image dataset (10 classes: shape x
stripe orientation, procedural and seeded, no download). Finishes on a 2-core CPU in under
5 minutes, compile included.

  python -m structvit_jax.main --config=configs/demo.py --workdir=/tmp/demo

Expected: eval top-1 0.879 (chance 0.1) after 1560 steps, 1m33s wall on a quiet 2-core CPU
(58 s with the compiled programs cached); deterministic on one machine (README: Training).
Variants: image_size, epochs, train_examples (e.g. `configs/demo.py:epochs=1` for a smoke run).
"""

import ml_collections

from structvit_jax import config_utils

base = config_utils.import_sibling(__file__, "base")


def get_config(arg=None):
  a = config_utils.parse_arg(arg, image_size=32, epochs=10.0, train_examples=10000)
  c = base.get_base_config()
  c.model.name = "structvit_tiny"
  c.model.kwargs.num_classes = 10
  c.model.kwargs.drop_path_rate = 0.0
  # U^K / U^V at the centre tap, as when this demo's numbers and figures (README) were
  # measured; from scratch the models default to PyTorch's conv init (docs/structsa.md).
  c.model.kwargs.structsa = ml_collections.ConfigDict(dict(init="centre"))

  c.data.name = "synthetic_image"
  c.data.image_size = a.image_size
  c.data.train_examples = a.train_examples
  c.data.eval_examples = 2000
  c.data.random_flip = True
  c.data.generator_seed = 0        # the dataset itself (fixed); c.seed drives training

  c.batch_size = 64
  c.num_epochs = a.epochs
  c.warmup_epochs = 0.5
  c.lr = 3e-3
  c.lr_base_batch_size = 64
  c.min_lr = 1e-5
  c.weight_decay = 0.05
  c.label_smoothing = 0.0
  c.mixup_alpha = 0.0              # short run: no mixup/cutmix
  c.cutmix_alpha = 0.0
  c.eval_every_epochs = 5.0
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 1
  c.log_every_steps = 50
  return c
