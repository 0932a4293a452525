"""TimeSformer (Bertasius et al., ICML 2021): ViT video transformer, every attention scheme.

Follows the official `timesformer/models/vit.py` (parameters, embeddings and their
nearest-rule resizing: docs/official_weights.md, "TimeSformer"):
  * The residual stream is [B, 1 + N*T, C]: the class token, then patch n of frame t at
    1 + n*T + t (space-major, time-minor), n = h*W + w.
  * Block = a chain of attention stages over groups of tokens, then the MLP. Every stage
    but the last is `x += <prefix>_fc(DropPath(<prefix>_attn(<prefix>_norm1(x))))` over
    the patch tokens only (no class token; `<prefix>_fc` zero-initialised, in every
    block); the last stage is `norm1`/`attn` over the patch groups with the class token
    repeated into each group and its outputs averaged over the groups. DropPath acts on
    the grouped tensor (one draw per group), as the official code does.

  | attention_type      | pre-stages (no cls, each + fc)     | last stage (cls joins)         |
  | divided_space_time  | temporal: per site (h, w), over T  | per frame t, over H*W          |
  | joint_space_time    | -                                  | all H*W*T tokens               |
  | space_only          | -                                  | per frame (blocks run on B*T   |
  |                     |                                    | one-frame clips; the cls is    |
  |                     |                                    | averaged over t before `norm`) |
  | sparse_local_global | local: per T x H/2 x W/2 window    | global: per parity class       |
  |                     | (4 spatial quadrants, all frames)  | (t%2, h%2, w%2), stride 2      |
  | axial               | temporal: per (h, w), over T;      | height: per (t, w), over H     |
  |                     | width: per (t, h), over W          |                                |

'sparse_local_global' and 'axial' are not in the official code; they follow the paper's
description (Sec. 3 and Fig. 2/3). L+G's "neighbouring patches" are a fixed partition into
the four spatial quadrants (each spanning every frame), the block-local pattern of Sparse
Transformers (Child et al. 2019) that the paper cites (a sliding window would cost as much
as joint attention in dense form); its global stage has 8 parity groups (4 when T = 1). It
needs H and W even, and T even or 1. Names: L+G `local_{norm1,attn,fc}` then
`norm1`/`attn`; axial `temporal_*`, `width_*`, then `norm1`/`attn` (height), so the last
stage always has the names of the divided scheme's spatial attention and of the 2-D ViT a
checkpoint is inflated from.

Cost per scheme: docs/flops.md, "TimeSformer's attention schemes".

T = 1 equalities (tests/test_timesformer.py), with shared weights:
  * divided == joint whenever every `temporal_fc` is zero (its init): temporal attention
    over one token returns proj(v), which the zero fc discards, and the spatial stage over
    one frame with one cls copy is the joint block.
  * joint == space_only whenever `time_embed` is zero (its init); space_only has none.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from structvit_jax.models import layers
from structvit_jax.models.structsa import StructSA, StructSAConfig

Array = jax.Array
Dtype = Any

ATTENTION_TYPES = ("divided_space_time", "joint_space_time", "space_only",
                   "sparse_local_global", "axial")

# A stage: (parameter-name prefix, reshape of the (H, W, T) grid, axes of that reshape that
# index groups; the other axes form the sequence attended over).
Stage = tuple[str, tuple[int, ...], tuple[int, ...]]


def _half(n: int, what: str) -> int:
  if n % 2:
    raise ValueError(f"sparse_local_global needs an even {what} grid, got {n}")
  return n // 2


def attention_stages(attention_type: str, h: int, w: int, t: int) -> list[Stage]:
  """The attention stages of one block on an (h, w, t) token grid (table in the docstring)."""
  hwt = (h, w, t)
  if attention_type in ("joint_space_time", "space_only"):
    return [("", hwt, ())]
  if attention_type == "divided_space_time":
    return [("temporal", hwt, (0, 1)), ("", hwt, (2,))]
  if attention_type == "axial":
    return [("temporal", hwt, (0, 1)), ("width", hwt, (0, 2)), ("", hwt, (1, 2))]
  if attention_type == "sparse_local_global":
    h2, w2 = _half(h, "height"), _half(w, "width")
    t2, st = (1, 1) if t == 1 else (_half(t, "time"), 2)
    # local: h = quadrant_row * h2 + i; global: h = i * 2 + parity (likewise w, t).
    return [("local", (2, h2, 2, w2, t), (0, 2)), ("", (h2, 2, w2, 2, t2, st), (1, 3, 5))]
  raise ValueError(f"attention_type={attention_type!r}; valid: {', '.join(ATTENTION_TYPES)}")


def grouped(fn: Callable[[Array], Array], x: Array, cls: Array | None,
            split: Sequence[int], group_axes: Sequence[int]) -> tuple[Array, Array | None]:
  """Applies fn to [B*G, L, C] groups of the tokens x [B, H, W, T, C].

  x is reshaped to [B, *split, C]; the `group_axes` of `split` index the G groups, the
  rest the L tokens of a group (in row-major order). With cls [B, 1, C], the class token
  is prepended to every group (b-major, like the official `repeat`) and its G outputs are
  averaged. Returns fn's output in x's layout and the class output (or None)."""
  b, *grid, c = x.shape
  seq_axes = [a for a in range(len(split)) if a not in group_axes]
  perm = (0, *(1 + a for a in group_axes), *(1 + a for a in seq_axes), len(split) + 1)
  y = x.reshape(b, *split, c).transpose(perm)
  moved = y.shape
  g = math.prod(split[a] for a in group_axes)
  y = y.reshape(b * g, -1, c)
  if cls is not None:
    y = jnp.concatenate([jnp.repeat(cls, g, axis=0), y], axis=1)
  y = fn(y)
  cls_out = None
  if cls is not None:
    cls_out, y = y[:, :1].reshape(b, g, 1, c).mean(axis=1), y[:, 1:]
  return y.reshape(moved).transpose(np.argsort(perm)).reshape(b, *grid, c), cls_out


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """Source indices of torch's F.interpolate(mode='nearest') from n_in to n_out samples:
  floor(i * (n_in / n_out)) in float32, clipped (torch's upsample_nearest kernels)."""
  if n_out == n_in:
    return np.arange(n_out)
  if n_out == 2 * n_in:
    return np.arange(n_out) >> 1
  scale = np.float32(n_in) / np.float32(n_out)
  return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


class Block(nn.Module):
  """One TimeSformer block on the stream [B, 1 + H*W*T, C] over the token grid (H, W, T)."""
  num_heads: int
  grid: tuple[int, int, int]
  attention_type: str = "divided_space_time"
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path: float = 0.0
  train: bool = False
  attention_impl: str = "auto"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h, w, t = self.grid
    b, _, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = functools.partial(nn.LayerNorm, epsilon=1e-6, **kw)
    # Plain multi-head attention over each group: StructSA with D = 0 (`qkv`, `proj` as the
    # official Linear layers, qkv features ordered (3, heads, head_dim)).
    attn = functools.partial(StructSA, num_heads=self.num_heads, qkv_bias=self.qkv_bias,
                             structsa=StructSAConfig(attention_impl=self.attention_impl), **kw)
    dp = layers.DropPath(self.drop_path, deterministic=not self.train)
    cls, xs = x[:, :1], x[:, 1:].reshape(b, h, w, t, c)
    *pre, (_, split, group_axes) = attention_stages(self.attention_type, h, w, t)
    for prefix, p_split, p_groups in pre:
      norm, att = ln(name=f"{prefix}_norm1"), attn(name=f"{prefix}_attn")
      r, _ = grouped(lambda y: dp(att(norm(y))), xs, None, p_split, p_groups)
      xs = xs + nn.Dense(c, kernel_init=nn.initializers.zeros, name=f"{prefix}_fc", **kw)(r)
    norm, att = ln(name="norm1"), attn(name="attn")
    r, r_cls = grouped(lambda y: dp(att(norm(y))), xs, cls, split, group_axes)
    x = jnp.concatenate([cls + r_cls, (xs + r).reshape(b, h * w * t, c)], axis=1)
    mlp = layers.Mlp(int(c * self.mlp_ratio), name="mlp", **kw)
    return x + dp(mlp(ln(name="norm2")(x)))


class TimeSformer(nn.Module):
  """TimeSformer on clips [B, T, H, W, 3] (an image [B, H, W, 3] is a one-frame clip);
  returns logits [B, num_classes] (float32). Schemes and names: module docstring."""
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  num_classes: int = 400
  drop_path_rate: float = 0.1
  attention_type: str = "divided_space_time"
  num_frames: int = 8               # construction grid of time_embed
  img_size: int = 224               # construction grid of pos_embed
  attention_impl: str = "auto"
  remat: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.attention_type not in ATTENTION_TYPES:
      raise ValueError(f"attention_type={self.attention_type!r}; "
                       f"valid: {', '.join(ATTENTION_TYPES)}")
    if x.ndim == 4:
      x = x[:, None]
    if x.ndim != 5 or x.shape[-1] != 3:
      raise ValueError(f"TimeSformer expects clips [B, T, H, W, 3], got {x.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t = x.shape[:2]
    x = x.astype(self.dtype or x.dtype)
    p = self.patch_size
    x = layers.PatchEmbed(self.embed_dim, (p, p), (p, p), name="patch_embed", **kw)(
        x.reshape(b * t, *x.shape[2:]))
    _, h, w, c = x.shape
    g0 = self.img_size // self.patch_size
    cls = self.param("cls_token", layers.trunc_normal_02, (1, 1, c), self.param_dtype)
    pos = self.param("pos_embed", layers.trunc_normal_02, (1, 1 + g0 * g0, c), self.param_dtype)
    pos = pos.astype(x.dtype)
    pos_grid = pos[0, 1:].reshape(g0, g0, c)[nearest_indices(g0, h)][:, nearest_indices(g0, w)]
    x = x + pos_grid
    cls = cls.astype(x.dtype) + pos[:, :1]
    if self.attention_type == "space_only":
      # Every frame is its own clip with its own class token (batch B*T).
      batch, grid = b * t, (h, w, 1)
      tokens = x.reshape(b * t, h * w, c)
    else:
      te = self.param("time_embed", nn.initializers.zeros, (1, self.num_frames, c),
                      self.param_dtype)
      te = te[0, nearest_indices(self.num_frames, t)].astype(x.dtype)
      x = x.reshape(b, t, h, w, c).transpose(0, 2, 3, 1, 4) + te  # [B, H, W, T, C]
      batch, grid = b, (h, w, t)
      tokens = x.reshape(b, h * w * t, c)
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, c)), tokens], axis=1)
    block = nn.remat(Block) if self.remat else Block
    for i, rate in enumerate(np.linspace(0.0, self.drop_path_rate, self.depth).tolist()):
      x = block(num_heads=self.num_heads, grid=grid, attention_type=self.attention_type,
                mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, drop_path=rate, train=train,
                attention_impl=self.attention_impl, name=f"blocks_{i}", **kw)(x)
    cls = x[:, 0]
    if self.attention_type == "space_only":
      cls = cls.reshape(b, t, c).mean(axis=1)  # official: mean over t of all tokens, then norm
    cls = nn.LayerNorm(epsilon=1e-6, name="norm", **kw)(cls)
    return nn.Dense(self.num_classes, kernel_init=layers.trunc_normal_02, name="head",
                    **kw)(cls).astype(jnp.float32)
