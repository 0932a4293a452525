"""UniFormer (Li et al. 2022) and StructViT (UniFormer with StructSA in stages 3-4).

One code path for images [B, H, W, 3] and videos [B, T, H, W, 3]: the spatial rank comes
from the input. Faithful to the official code (docs/official_weights.md): LayerNorm
eps 1e-5 in patch embeds and 1e-6 in blocks, exact GELU, BatchNorm in conv blocks and the
final norm, layer scale, drop path linspace over all blocks, the conv-stem S† variant and
the token-labeling aux head. Submodule names follow the official state_dict one to one:
`blocks3.5.attn.qkv.weight` <-> params['blocks3_5']['attn']['qkv']['kernel'].
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from structvit_jax.models import layers
from structvit_jax.models.structsa import StructSA, StructSAConfig

Array = jax.Array
Dtype = Any

LAYER_SCALES = ("none", "sa", "all")


class ConvEmbed(nn.Module):
  """The conv stem of UniFormer-S† (`conv_stem=True`): 3x3 stride-2 convs with BatchNorm.
  head_embedding: proj = [0 conv(C/2), 1 BN, 2 GELU, 3 conv(C), 4 BN]; middle: [0 conv, 1 BN]."""
  features: int
  head: bool
  train: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    bn = functools.partial(nn.BatchNorm, use_running_average=not self.train, momentum=0.9,
                           epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype)
    conv = lambda f, name, cin: layers.torch_conv(f, (3, 3), (2, 2), [(1, 1), (1, 1)], 9 * cin,
                                                  name, self.dtype, self.param_dtype)
    if self.head:
      x = bn(name="proj_1")(conv(self.features // 2, "proj_0", x.shape[-1])(x))
      x = layers.gelu(x)
      return bn(name="proj_4")(conv(self.features, "proj_3", self.features // 2)(x))
    return bn(name="proj_1")(conv(self.features, "proj_0", x.shape[-1])(x))


class CBlock(nn.Module):
  """Stages 1-2: x + pos_embed(x); x + DP(conv2(attn(conv1(BN(x))))); x + DP(CMlp(BN(x)))."""
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  layer_scale: bool = False
  train: bool = False
  depthwise_impl: str = "auto"     # StructSAConfig.depthwise_impl of the model
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bn = functools.partial(nn.BatchNorm, use_running_average=not self.train, momentum=0.9,
                           epsilon=1e-5, **kw)
    dense = lambda name: nn.Dense(c, kernel_init=layers.torch_conv_kernel_init,
                                  bias_init=layers.torch_conv_bias_init(c), name=name, **kw)
    dp = layers.DropPath(self.drop_path, deterministic=not self.train)
    x = x + layers.DepthwiseConv(3, impl=self.depthwise_impl, name="pos_embed", **kw)(x)
    y = dense("conv1")(bn(name="norm1")(x))
    y = layers.DepthwiseConv(5, impl=self.depthwise_impl, name="attn", **kw)(y)
    y = dense("conv2")(y)
    x = x + dp(layers.layer_scale(self, "gamma_1", y, self.layer_scale))
    y = layers.Mlp(int(c * self.mlp_ratio), conv_init=True, name="mlp", **kw)(bn(name="norm2")(x))
    return x + dp(layers.layer_scale(self, "gamma_2", y, self.layer_scale))


class SABlock(nn.Module):
  """Stages 3-4: x + pos_embed(x); x + DP(attn(LN(x))); x + DP(Mlp(LN(x))), with attn = StructSA
  over the token grid (D = 0: UniFormer's multi-head self-attention)."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  layer_scale: bool = False
  train: bool = False
  structsa: StructSAConfig = StructSAConfig()
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = functools.partial(nn.LayerNorm, epsilon=1e-6, **kw)
    dp = layers.DropPath(self.drop_path, deterministic=not self.train)
    x = x + layers.DepthwiseConv(3, impl=self.structsa.depthwise_impl, name="pos_embed", **kw)(x)
    y = StructSA(self.num_heads, self.structsa, name="attn", **kw)(ln(name="norm1")(x))
    x = x + dp(layers.layer_scale(self, "gamma_1", y, self.layer_scale))
    y = layers.Mlp(int(x.shape[-1] * self.mlp_ratio), name="mlp", **kw)(ln(name="norm2")(x))
    return x + dp(layers.layer_scale(self, "gamma_2", y, self.layer_scale))


class UniFormer(nn.Module):
  """UniFormer / StructViT-{S,B,L}-D-S for images and videos.

  Input [B, H, W, 3] or [B, T, H, W, 3] (already normalised); returns logits [B, classes]
  (float32). With `token_labeling` the output is the official eval rule
  head(mean) + 0.5 * max_tokens(aux_head(tokens)); token-labeling training
  (structvit_jax/token_label_loss.py, docs/token_labeling.md) calls it with `dense=True` for
  (head(mean) [B, classes], aux_head(tokens) [B, N, classes]) and with `mix_box`, MixToken's
  box on the last stage's token grid (int32 [y0, x0, y1, x1]): the stage-1 tokens under it
  are swapped with those of the batch flipped along its first axis, and the aux logits
  under it swapped back, so each aux token answers for the image its patch came from.
  """
  depth: Sequence[int] = (3, 4, 8, 3)
  embed_dim: Sequence[int] = (64, 128, 320, 512)
  head_dim: int = 64
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  drop_path_rate: float = 0.1
  layer_scale: str = "none"        # 'none' | 'sa' (SABlocks, base_ls) | 'all' (large_ls)
  conv_stem: bool = False          # UniFormer-S† head/middle conv embeddings (images only)
  token_labeling: bool = False     # aux_head + the TL eval rule (UniFormer-L)
  structsa: StructSAConfig = StructSAConfig()  # attention of stages 3-4; D = 0: UniFormer
  remat: bool = False              # rematerialise each block in the backward pass
  dtype: Dtype | None = None       # compute dtype (bf16); params stay param_dtype
  param_dtype: Dtype = jnp.float32

  def _validate(self, x: Array):
    if len(self.depth) != 4 or len(self.embed_dim) != 4:
      raise ValueError(f"depth {self.depth} and embed_dim {self.embed_dim} need 4 stages")
    for c in self.embed_dim[2:]:
      if c % self.head_dim:
        raise ValueError(f"embed_dim {c} is not a multiple of head_dim {self.head_dim}")
    if self.layer_scale not in LAYER_SCALES:
      raise ValueError(f"layer_scale={self.layer_scale!r}; valid: {LAYER_SCALES}")
    if x.ndim not in (4, 5) or x.shape[-1] != 3:
      raise ValueError(f"expected images [B, H, W, 3] or clips [B, T, H, W, 3], got {x.shape}")
    if self.conv_stem and x.ndim == 5:
      raise ValueError("conv_stem (UniFormer-S†) is an image-only variant")
    if self.drop_path_rate < 0 or self.drop_path_rate >= 1:
      raise ValueError(f"drop_path_rate={self.drop_path_rate} must be in [0, 1)")

  @nn.compact
  def __call__(self, x: Array, train: bool = False, dense: bool = False,
               mix_box: Array | None = None) -> Array | tuple[Array, Array]:
    self._validate(x)
    if (dense or mix_box is not None) and not self.token_labeling:
      raise ValueError("dense outputs and MixToken need token_labeling=True (the aux_head)")
    if (dense or mix_box is not None) and x.ndim == 5:
      raise ValueError("token labeling is an image-only training mode")
    if mix_box is not None and not dense:
      raise ValueError("MixToken (mix_box) needs dense=True: the aux tokens are un-mixed")
    video = x.ndim == 5
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype or x.dtype)
    dpr = np.linspace(0.0, self.drop_path_rate, sum(self.depth)).tolist()
    cblock, sablock = CBlock, SABlock
    if self.remat:  # explicit names below keep parameter paths identical with and without
      cblock, sablock = nn.remat(CBlock), nn.remat(SABlock)
    i = 0
    for stage, (n, c) in enumerate(zip(self.depth, self.embed_dim)):
      if self.conv_stem:
        x = ConvEmbed(c, head=stage == 0, train=train, name=f"patch_embed{stage + 1}", **kw)(x)
      else:
        if stage == 0:  # 4x4 patches; video: 3x4x4 tubelets, stride 2 in time, pad 1
          k, s, p = ((3, 4, 4), (2, 4, 4), [(1, 1), (0, 0), (0, 0)]) if video else \
                    ((4, 4), (4, 4), [(0, 0), (0, 0)])
        else:
          k, s, p = ((1, 2, 2), (1, 2, 2), [(0, 0)] * 3) if video else ((2, 2), (2, 2), [(0, 0)] * 2)
        x = layers.PatchEmbed(c, k, s, p, norm=True, name=f"patch_embed{stage + 1}", **kw)(x)
      if stage == 0 and mix_box is not None:
        # Stage-1 token (y, x) lies under last-stage token (y // 8, x // 8): 3 stride-2 embeds.
        x = _swap_in_box(x, mix_box, 8)
      for b in range(n):
        common = dict(mlp_ratio=self.mlp_ratio, drop_path=dpr[i], train=train,
                      name=f"blocks{stage + 1}_{b}", **kw)
        if stage < 2:
          x = cblock(layer_scale=self.layer_scale == "all",
                     depthwise_impl=self.structsa.depthwise_impl, **common)(x)
        else:
          x = sablock(num_heads=c // self.head_dim, structsa=self.structsa,
                      layer_scale=self.layer_scale != "none", **common)(x)
        i += 1
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="norm",
                     **kw)(x)
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    linear = functools.partial(nn.Dense, self.num_classes, kernel_init=layers.trunc_normal_02,
                               **kw)
    logits = linear(name="head")(tokens.mean(axis=1))
    if self.token_labeling:
      aux = linear(name="aux_head")(tokens)
      if dense:
        if mix_box is not None:
          aux = _swap_in_box(aux.reshape(x.shape[:3] + aux.shape[-1:]), mix_box, 1)
          aux = aux.reshape(tokens.shape[:2] + aux.shape[-1:])
        return logits.astype(jnp.float32), aux.astype(jnp.float32)
      logits = logits + 0.5 * aux.max(axis=1)
    return logits.astype(jnp.float32)


def _swap_in_box(x: Array, box: Array, scale: int) -> Array:
  """x [B, H, W, C] with the tokens whose (y // scale, x // scale) falls in box
  [y0, x0, y1, x1) (half-open) taken from the batch flipped along its first axis."""
  ys = jnp.arange(x.shape[1])[:, None] // scale
  xs = jnp.arange(x.shape[2])[None, :] // scale
  inside = (ys >= box[0]) & (ys < box[2]) & (xs >= box[1]) & (xs < box[3])
  return jnp.where(inside[None, :, :, None], x[::-1], x)
