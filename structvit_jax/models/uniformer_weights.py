"""UniFormer's weight-adaptation rules (docs/official_weights.md): its classifiers, and the
video model as the image model whose conv kernels gain a leading T axis (inflation)."""

from structvit_jax import weights

RULES = weights.Family(heads=("head", "aux_head"), inflatable=("kernel",))
