"""Structural self-attention (StructSA), Kim et al., CVPR 2024.

SQKA with U^K pattern detectors, one joint softmax over (key site, D), and context (or
element) aggregation with U^V context aggregators. 'reference' is the paper's literal form,
'fused' (default) is standard attention over D-fold convolved keys/values; class tokens,
attention capture (`mutable=["intermediates"]`) and costs: docs/structsa.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from structvit_jax.models import layers
from structvit_jax.models.attention import ATTENTION_IMPLS, dot_product_attention

Array = jax.Array
Dtype = Any

AGGREGATIONS = ("context", "element")
FORMS = ("fused", "reference")
# U^K / U^V initialisation (docs/structsa.md, "Initialisation"): 'centre' = identity centre tap
# (+ init_noise), StructSA == SA at init; 'torch' = PyTorch's conv default for these depthwise
# kernels, U(-1/sqrt(M), 1/sqrt(M)) with M the window's taps, as a StructViT built on the
# official UniFormer code (whose _init_weights leaves convs alone) would start.
INITS = ("centre", "torch")


@dataclasses.dataclass(frozen=True)
class StructSAConfig:
  """StructSA's settings: the one object the layer, the models (field `structsa`), the zoo
  presets, the recipes (`c.model.kwargs.structsa`) and model.json carry (docs/structsa.md).

  Defaults are what the models use: D = 0 (UniFormer, DeiT; the StructViT presets set D and
  S) and PyTorch's conv init for U^K / U^V ('centre' with init_noise 0 makes StructSA equal
  SA at init). Invalid settings raise ValueError here, at construction.
  """
  d: int = 0                       # D, structure dimension; 0 = vanilla SA, 1 + context = ConvSA
  kernel_size: int | tuple[int, ...] = 3  # M, window per grid axis (3 -> 3x3 / 3x3x3)
  stride: int = 1                  # S, over H and W of the key/value grid; needs D > 0
  aggregation: str = "context"     # AGGREGATIONS: 'context' (eq. 5) or 'element' (eq. 4)
  init: str = "torch"              # INITS: U^K / U^V from scratch (weights loaded replace them;
                                   # why 'torch': docs/structsa.md, "Initialisation")
  init_noise: float = 0.02         # 'centre': std of N(0, s^2) on the centre tap; 0: == SA at init
  form: str = "fused"              # FORMS: 'fused' or 'reference' (docs/structsa.md)
  attention_impl: str = "auto"     # ATTENTION_IMPLS (attention.py), the fused form's kernel
  depthwise_impl: str = "auto"     # DEPTHWISE_IMPLS (layers.py): the key/value convs, and every
                                   # other depthwise conv of the model (UniFormer)

  def __post_init__(self):
    if not isinstance(self.kernel_size, int):  # JSON gives lists; a field must be hashable
      object.__setattr__(self, "kernel_size", tuple(int(k) for k in self.kernel_size))
    kernel = (self.kernel_size,) if isinstance(self.kernel_size, int) else self.kernel_size
    switches = (("aggregation", AGGREGATIONS), ("form", FORMS), ("init", INITS),
                ("attention_impl", ATTENTION_IMPLS), ("depthwise_impl", layers.DEPTHWISE_IMPLS))
    for ok, msg in [
        (self.d >= 0, f"D={self.d} must be >= 0 (0 = vanilla SA)"),
        (self.stride >= 1, f"stride={self.stride} must be >= 1"),
        (self.d > 0 or self.stride == 1,
         f"stride={self.stride} needs D > 0: vanilla SA (D = 0) attends the unstrided grid"),
        (all(k >= 1 and k % 2 for k in kernel), f"kernel size M={kernel} must be odd, positive"),
        *((getattr(self, n) in v, f"{n}={getattr(self, n)!r}; valid: {', '.join(v)}")
          for n, v in switches)]:
      if not ok:
        raise ValueError(f"StructSA: {msg}")

  def replace(self, **changes: Any) -> "StructSAConfig":
    return dataclasses.replace(self, **changes)


def centre_tap_init(noise_std: float = 0.0):
  """Initialiser for U^K / U^V of shape [*window, D, C]: 1 at the window's centre tap, 0
  elsewhere, plus N(0, noise_std^2) noise (why: docs/structsa.md, Initialisation)."""

  def init(key, shape, dtype=jnp.float32):
    rank = len(shape) - 2
    w = np.zeros(shape, np.float32)
    w[tuple(k // 2 for k in shape[:rank])] = 1.0
    w = jnp.asarray(w, dtype)
    if noise_std:
      w = w + noise_std * jax.random.normal(key, shape, dtype)
    return w

  return init


def torch_depthwise_init():
  """PyTorch's default init of a depthwise conv (groups = C) holding U^K / U^V [*window, D, C]:
  kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = the window's taps
  (each output channel sees one input channel)."""

  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / np.sqrt(np.prod(shape[:-2]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def structure_init(cfg: "StructSAConfig"):
  """The initialiser of U^K / U^V that cfg.init names."""
  return torch_depthwise_init() if cfg.init == "torch" else centre_tap_init(cfg.init_noise)


def _accumulation(*dtypes: Dtype) -> Dtype:
  """float32 accumulation for low-precision inputs, float64 for float64 (x64) inputs."""
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def aggregated_weights(a_grid: Array, u_v: Array, grid: Sequence[int],
                       strides: Sequence[int]) -> Array:
  """The final attention map W_i of StructSA on the value grid (Fig. 4; docs/structsa.md,
  "Two implementations"): a transposed strided conv, one conv with lhs dilation S.
  a_grid: [Q, *grid', heads, D] (Q queries, grid' the key grid); u_v: [*Mv, D, C]
  with C = heads * head_dim; grid: the value grid. Returns W [Q, *grid, C] in float32 (float64
  for float64 inputs).
  """
  q_n, *out_grid, h, dd = a_grid.shape
  rank = len(grid)
  window_v = u_v.shape[:rank]
  lhs_spec, rhs_spec, out_spec = layers._layouts(rank)
  acc = _accumulation(a_grid.dtype, u_v.dtype)
  a = a_grid.reshape(q_n, *out_grid, h * dd).astype(acc)
  rhs_v = jnp.flip(u_v, axis=tuple(range(rank))).astype(acc)   # [*Mv, D(in), C(out)]
  pads_v = []
  for size, o, m, st in zip(grid, out_grid, window_v, strides):
    p = (m - 1) // 2
    pads_v.append((m - 1 - p, size - 1 - (o - 1) * st + p))
  dims_v = jax.lax.conv_dimension_numbers(a.shape, rhs_v.shape, (lhs_spec, rhs_spec, out_spec))
  return jax.lax.conv_general_dilated(a, rhs_v, (1,) * rank, pads_v, lhs_dilation=tuple(strides),
                                      dimension_numbers=dims_v, feature_group_count=h)


class StructSA(nn.Module):
  """Multi-head structural self-attention over tokens on a grid.

  Call with x [B, *grid, C] and optionally extra tokens [B, E, C] (class token); returns the
  outputs in the same structure. Parameters: `qkv` (Dense C -> 3C, output features ordered
  (3, heads, head_dim) as the official UniFormer), `proj`, and for D > 0 `u_k` [*M, D, C]
  (pattern detectors) and `u_v` [*M, D, C] (context aggregators; a 1-tap window for
  'element' aggregation).
  """
  num_heads: int
  structsa: StructSAConfig = StructSAConfig()
  qkv_bias: bool = True
  qkv_init_std: float = 0.02       # truncated-normal std of the qkv kernel (timm's 0.02)
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def _windows(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    if not 1 <= rank <= 3:
      raise ValueError(f"StructSA: token grids of rank 1, 2 or 3 are supported, got rank {rank}")
    cfg = self.structsa
    window_k = layers.as_tuple(cfg.kernel_size, rank)
    window_v = window_k if cfg.aggregation == "context" else (1,) * rank
    # Stride over H and W only: the last two grid axes (the only axis of a sequence).
    return window_k, window_v, tuple(1 if a < rank - 2 else cfg.stride for a in range(rank))

  @nn.compact
  def __call__(self, x: Array, extra: Array | None = None):
    b, *grid, c = x.shape
    rank = len(grid)
    window_k, window_v, strides = self._windows(rank)
    h = self.num_heads
    if c % h:
      raise ValueError(f"StructSA: {c} channels do not split into {h} heads")
    hd = c // h
    dtype = self.dtype or x.dtype
    n_grid = int(np.prod(grid))
    n_extra = 0 if extra is None else extra.shape[1]
    tokens = x.reshape(b, n_grid, c)
    if extra is not None:
      tokens = jnp.concatenate([extra.astype(x.dtype), tokens], axis=1)

    qkv_init = (layers.trunc_normal_02 if self.qkv_init_std == 0.02 else
                nn.initializers.truncated_normal(stddev=self.qkv_init_std))
    qkv = nn.Dense(3 * c, use_bias=self.qkv_bias, dtype=dtype, param_dtype=self.param_dtype,
                   kernel_init=qkv_init, name="qkv")(tokens)
    q, k, v = jnp.split(qkv.reshape(b, n_extra + n_grid, 3, h, hd), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]           # [B, N, heads, hd]

    u_k = u_v = None
    if self.structsa.d > 0:
      init = structure_init(self.structsa)
      u_k = self.param("u_k", init, (*window_k, self.structsa.d, c), self.param_dtype)
      u_v = self.param("u_v", init, (*window_v, self.structsa.d, c), self.param_dtype)

    if self.structsa.form == "fused":
      y = self._fused(q, k, v, u_k, u_v, grid, n_extra, strides)
    else:
      y = self._reference(q, k, v, u_k, u_v, grid, n_extra, strides, window_k, window_v)
    y = nn.Dense(c, dtype=dtype, param_dtype=self.param_dtype,
                 kernel_init=layers.trunc_normal_02, name="proj")(y.reshape(b, -1, c))
    y_grid = y[:, n_extra:].reshape(b, *grid, c)
    return y_grid if extra is None else (y_grid, y[:, :n_extra])

  # -- fused: attention over N*D convolved keys ---------------------------------------------
  def _fused(self, q, k, v, u_k, u_v, grid, n_extra, strides):
    b, n, h, hd = q.shape
    if self.structsa.d > 0:
      ke, kg = k[:, :n_extra], k[:, n_extra:].reshape(b, *grid, h * hd)
      ve, vg = v[:, :n_extra], v[:, n_extra:].reshape(b, *grid, h * hd)
      # K~, V~: [B, *grid', D, C], flattened so that every (j, d) is one key.
      impl = self.structsa.depthwise_impl
      k_t = layers.depthwise_conv(kg, u_k, strides, impl).reshape(b, -1, h, hd)
      v_t = layers.depthwise_conv(vg, u_v, strides, impl).reshape(b, -1, h, hd)
      if n_extra:
        k = jnp.concatenate([jnp.repeat(ke, self.structsa.d, axis=1), k_t], axis=1)
        v = jnp.concatenate([jnp.repeat(ve, self.structsa.d, axis=1), v_t], axis=1)
      else:
        k, v = k_t, v_t
    if not self.is_mutable_collection("intermediates"):
      return dot_product_attention(q, k, v, self.structsa.attention_impl)
    # Capture requested: the same softmax(q K~^T / sqrt(hd)) V~, with the weights kept.
    logits = jnp.einsum("bihc,bjhc->bihj", q * (hd ** -0.5), k,
                        preferred_element_type=_accumulation(q.dtype))
    a = jax.nn.softmax(logits, axis=-1)
    dd = max(self.structsa.d, 1)
    self._capture(a.reshape(b, n, h, -1, dd), n_extra, grid, strides)
    return jnp.einsum("bihj,bjhc->bihc", a.astype(v.dtype), v)

  def _capture(self, a, n_extra, grid, strides):
    """Sows the attention of the grid queries, a: [B, Nq, heads, E + N', D] (D = 1 for SA)."""
    b, _, h, _, dd = a.shape
    if self.structsa.d == 0:  # SA attends the unstrided grid
      strides = (1,) * len(grid)
    key_grid = tuple(layers.conv_output_size(g, 1, st) for g, st in zip(grid, strides))
    a = jnp.moveaxis(a[:, n_extra:], 2, 1)                       # [B, heads, N, E + N', D]
    out = {"attn_grid": a[:, :, :, n_extra:].reshape(b, h, *grid, *key_grid, dd),
           "strides": jnp.asarray(strides, jnp.int32)}
    if n_extra:
      out["attn_extra"] = a[:, :, :, :n_extra].reshape(b, h, *grid, n_extra, dd)
    self.sow("intermediates", "attention", out)

  # -- reference: the paper's literal definition ---------------------------------------------
  def _reference(self, q, k, v, u_k, u_v, grid, n_extra, strides, window_k, window_v):
    b, n, h, hd = q.shape
    rank = len(grid)
    acc = _accumulation(q.dtype)  # float32, or float64 under x64
    q = q * (hd ** -0.5)
    if self.structsa.d == 0:
      s = jnp.einsum("bihc,bjhc->bhij", q, k, preferred_element_type=acc)
      a = jax.nn.softmax(s, axis=-1)
      if self.is_mutable_collection("intermediates"):
        self._capture(jnp.moveaxis(a, 1, 2)[..., None], n_extra, grid, strides)
      return jnp.einsum("bhij,bjhc->bihc", a.astype(v.dtype), v)

    dd = self.structsa.d
    kg, vg = k[:, n_extra:], v[:, n_extra:]
    ke, ve = k[:, :n_extra], v[:, :n_extra]
    lhs_spec, rhs_spec, out_spec = layers._layouts(rank)
    pads_k = [((m - 1) // 2,) * 2 for m in window_k]

    # SQKA: channel-wise correlation maps of every query over the key grid, convolved with
    # the D pattern detectors (a grouped conv: group = head, in = head_dim, out = D).
    corr = (q[:, :, None] * kg[:, None]).reshape(b * n, *grid, h * hd)
    rhs = u_k.reshape(*window_k, dd, h, hd)
    rhs = jnp.moveaxis(rhs, (-3, -2, -1), (-1, -2, -3)).reshape(*window_k, hd, h * dd)
    dims = jax.lax.conv_dimension_numbers(corr.shape, rhs.shape, (lhs_spec, rhs_spec, out_spec))
    s = jax.lax.conv_general_dilated(corr, rhs.astype(corr.dtype), strides, pads_k,
                                     dimension_numbers=dims, feature_group_count=h,
                                     preferred_element_type=acc)
    out_grid = s.shape[1:-1]
    s = s.reshape(b, n, -1, h, dd)                               # [B, Nq, N', heads, D]
    s_extra = jnp.einsum("bihc,behc->biehc", q, ke, preferred_element_type=acc).sum(-1)
    s_extra = jnp.broadcast_to(s_extra[..., None], s_extra.shape + (dd,))  # [B, Nq, E, h, D]

    # Joint softmax over all N'*D grid entries and E*D extra entries.
    logits = jnp.concatenate([s_extra, s], axis=2)
    logits = jnp.moveaxis(logits, 3, 2).reshape(b, n, h, -1)
    a = jax.nn.softmax(logits, axis=-1).reshape(b, n, h, n_extra + s.shape[2], dd)
    if self.is_mutable_collection("intermediates"):
      self._capture(a, n_extra, grid, strides)
    a_extra = a[:, :, :, :n_extra]                               # [B, Nq, heads, E, D]
    a_grid = jnp.moveaxis(a[:, :, :, n_extra:], 2, 3)            # [B, Nq, N', heads, D]

    # Contextual aggregation with the dynamic kernels sum_d A_i[j, d] U^V[:, d], scattered
    # back onto the value grid.
    w = aggregated_weights(a_grid.reshape(b * n, *out_grid, h, dd), u_v, grid, strides)
    w = w.reshape(b, n, -1, h, hd)                               # [B, Nq, N, heads, hd]
    y = jnp.einsum("bijhc,bjhc->bihc", w, vg.astype(acc))
    y = y + jnp.einsum("bihe,behc->bihc", a_extra.sum(-1), ve.astype(acc))
    return y.astype(v.dtype)

