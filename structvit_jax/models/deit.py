"""DeiT-S with switchable attention: the backbone of the paper's Table 1 ablations.

d = 0: SA (DeiT); d = 1, aggregation 'context': ConvSA; d > 1: StructSA with window M and
'element' or 'context' aggregation. The class token is a query and a plain key/value entry
(StructSA docstring). Images [B, H, W, 3] or clips [B, T, H, W, 3]; the tables are sized at
init.

Clips: a tubelet patch embedding (temporal_patch_size x p x p; 1 = frame by frame, so no
convolution sees motion before attention), the spatial position table plus a temporal one
(`time_embed` [1, T', C], drawn like pos_embed: from scratch the model must tell the frames
apart to tell a direction from its reverse), and attention over the T' x H' x W'
token grid (StructSA's window M x M x M). An image DeiT loads into it by inflation
(weights.fit with inflate_mode): the patch kernel gains a T axis, pos_embed is kept and
time_embed starts at zero (docs/official_weights.md, "DeiT on clips").
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from structvit_jax.models import layers
from structvit_jax.models.structsa import StructSA, StructSAConfig

Array = jax.Array
Dtype = Any


class Block(nn.Module):
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  train: bool = False
  structsa: StructSAConfig = StructSAConfig()
  qkv_init_std: float = 0.02
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cls: Array) -> tuple[Array, Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = functools.partial(nn.LayerNorm, epsilon=1e-6, **kw)
    dp = layers.DropPath(self.drop_path, deterministic=not self.train)
    norm1 = ln(name="norm1")
    y, y_cls = StructSA(self.num_heads, self.structsa, qkv_init_std=self.qkv_init_std,
                        name="attn", **kw)(norm1(x), norm1(cls))
    x, cls = x + dp(y), cls + dp(y_cls)
    mlp, norm2 = layers.Mlp(int(x.shape[-1] * self.mlp_ratio), name="mlp", **kw), ln(name="norm2")
    return x + dp(mlp(norm2(x))), cls + dp(mlp(norm2(cls)))


class DeiT(nn.Module):
  """ViT/DeiT with StructSA-switchable attention; returns logits [B, classes] (float32)."""
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  drop_path_rate: float = 0.1
  structsa: StructSAConfig = StructSAConfig()  # D = 0: SA; 1 + context: ConvSA; >1: StructSA
  temporal_patch_size: int = 1  # clips: frames per tubelet (T must be a multiple)
  # std of the qkv kernels' truncated-normal init: timm's 0.02 gives DeiT-S (384 wide) initial
  # attention logits of std ~0.15, a 64-wide model ~0.03 (uniform attention; README, "Table 1
  # at laptop scale", for why that matters and what the benchmark sets)
  qkv_init_std: float = 0.02
  remat: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def _embed(self, x: Array) -> Array:
    """Patches (images) or tubelets (clips) -> tokens [B, (T',) H', W', C]."""
    if x.ndim not in (4, 5) or x.shape[-1] != 3:
      raise ValueError(f"DeiT expects images [B, H, W, 3] or clips [B, T, H, W, 3], "
                       f"got {x.shape}")
    p, tp = self.patch_size, self.temporal_patch_size
    window = (p, p) if x.ndim == 4 else (tp, p, p)
    if x.ndim == 5 and (tp < 1 or x.shape[1] % tp):
      raise ValueError(f"DeiT: {x.shape[1]} frames do not split into tubelets of "
                       f"temporal_patch_size={tp}")
    return layers.torch_conv(self.embed_dim, window, window, "VALID", 3 * int(np.prod(window)),
                             "patch_embed", dtype=self.dtype, param_dtype=self.param_dtype
                             )(x.astype(self.dtype or x.dtype))

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = self._embed(x)
    b, *grid, gh, gw, c = x.shape   # grid: [T'] for clips, [] for images
    cls = self.param("cls_token", layers.trunc_normal_02, (1, 1, c), self.param_dtype)
    pos = self.param("pos_embed", layers.trunc_normal_02, (1, 1 + gh * gw, c), self.param_dtype)
    pos = pos.astype(x.dtype)
    cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c)) + pos[:, :1]
    x = x + pos[:, 1:].reshape(1, *(1 for _ in grid), gh, gw, c)
    if grid:
      time = self.param("time_embed", layers.trunc_normal_02, (1, grid[0], c), self.param_dtype)
      x = x + time.astype(x.dtype)[:, :, None, None]
    block = nn.remat(Block) if self.remat else Block
    for i, rate in enumerate(np.linspace(0.0, self.drop_path_rate, self.depth).tolist()):
      x, cls = block(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, drop_path=rate,
                     train=train, structsa=self.structsa, qkv_init_std=self.qkv_init_std,
                     name=f"blocks_{i}", **kw)(x, cls)
    cls = nn.LayerNorm(epsilon=1e-6, name="norm", **kw)(cls[:, 0])
    return nn.Dense(self.num_classes, kernel_init=layers.trunc_normal_02, name="head",
                    **kw)(cls).astype(jnp.float32)
