"""DeiT-S with switchable attention: the backbone of the paper's Table 1 ablations.

d = 0: SA (DeiT); d = 1, aggregation 'context': ConvSA; d > 1: StructSA with window M and
'element' or 'context' aggregation. The class token is a query and a plain key/value entry
(StructSA docstring). Images [B, H, W, 3]; the position table is sized at init.
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
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cls: Array) -> tuple[Array, Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = functools.partial(nn.LayerNorm, epsilon=1e-6, **kw)
    dp = layers.DropPath(self.drop_path, deterministic=not self.train)
    norm1 = ln(name="norm1")
    y, y_cls = StructSA(self.num_heads, self.structsa, name="attn", **kw)(norm1(x), norm1(cls))
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
  remat: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"DeiT expects images [B, H, W, 3], got {x.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    x = layers.torch_conv(self.embed_dim, (p, p), (p, p), "VALID", 3 * p * p, "patch_embed",
                          **kw)(x.astype(self.dtype or x.dtype))
    b, gh, gw, c = x.shape
    cls = self.param("cls_token", layers.trunc_normal_02, (1, 1, c), self.param_dtype)
    pos = self.param("pos_embed", layers.trunc_normal_02, (1, 1 + gh * gw, c), self.param_dtype)
    pos = pos.astype(x.dtype)
    cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c)) + pos[:, :1]
    x = x + pos[:, 1:].reshape(1, gh, gw, c)
    block = nn.remat(Block) if self.remat else Block
    for i, rate in enumerate(np.linspace(0.0, self.drop_path_rate, self.depth).tolist()):
      x, cls = block(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, drop_path=rate,
                     train=train, structsa=self.structsa, name=f"blocks_{i}", **kw)(x, cls)
    cls = nn.LayerNorm(epsilon=1e-6, name="norm", **kw)(cls[:, 0])
    return nn.Dense(self.num_classes, kernel_init=layers.trunc_normal_02, name="head",
                    **kw)(cls).astype(jnp.float32)
