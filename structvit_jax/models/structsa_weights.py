"""StructSA's weight-adaptation rules (docs/structsa.md): U^K / U^V have no torch twin; a
source without them (a UniFormer, a DeiT) gives the identity centre tap, with which the
model computes what the source did. Their windows inflate like conv kernels."""

import numpy as np

from structvit_jax import weights
from structvit_jax.models.structsa import centre_tap_init

STRUCTURE_LEAVES = ("u_k", "u_v")
RULES = weights.Family(
    untwinned=STRUCTURE_LEAVES, inflatable=STRUCTURE_LEAVES,
    fill=lambda path, shape, src, init: np.asarray(centre_tap_init(0.0)(None, shape, np.float32))
    if path[-1] in STRUCTURE_LEAVES else None)
