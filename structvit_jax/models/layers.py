"""Building blocks shared by the models: depthwise convolution, patch embedding, drop path,
MLPs, inits. `depthwise_conv` (UniFormer's position / local convs and StructSA's key / value
convs) picks its formulation by backend: docs/platform_notes.md, "Depthwise convolution on
XLA:CPU".
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

# Formulations of the depthwise convolution. 'auto': 'shift' on CPU, 'xla' elsewhere.
DEPTHWISE_IMPLS = ("auto", "xla", "shift")

# PyTorch's defaults, so that a model trained here starts where the official one does.
trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02)
torch_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv_bias_init(fan_in: int) -> Callable:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default conv bias init."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def gelu(x: Array) -> Array:
  """Exact (erf) GELU, as torch.nn.GELU(); flax's default is the tanh approximation."""
  return nn.gelu(x, approximate=False)


def as_tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
  if isinstance(v, int):
    return (v,) * n
  v = tuple(int(x) for x in v)
  if len(v) != n:
    raise ValueError(f"expected {n} values (one per grid axis), got {v}")
  return v


def resolve_depthwise_impl(impl: str) -> str:
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f"depthwise_impl={impl!r}; valid: {', '.join(DEPTHWISE_IMPLS)}")
  if impl == "auto":
    return "shift" if jax.default_backend() == "cpu" else "xla"
  return impl


def conv_output_size(n: int, k: int, stride: int) -> int:
  """Grid size after a window-k conv with symmetric 'same' padding (k - 1) // 2."""
  return (n + 2 * ((k - 1) // 2) - k) // stride + 1


def depthwise_conv(x: Array, kernel: Array, strides: Sequence[int] | None = None,
                   impl: str = "auto") -> Array:
  """Depthwise convolution with channel multiplier D and symmetric zero padding.

  Args:
    x: [B, *grid, C].
    kernel: [*window, D, C]; every window size odd. Output channel (d, c) is
      sum_m kernel[m, d, c] * x[S * j + m - pad, c].
    strides: per grid axis (default 1).
    impl: 'xla' (conv_general_dilated, feature_group_count=C), 'shift' (a sum of
      strided, shifted multiply-adds) or 'auto'.

  Returns:
    [B, *grid', D, C] with grid' = ceil(grid / strides).
  """
  rank = x.ndim - 2
  window = kernel.shape[:rank]
  d, c = kernel.shape[rank:]
  if kernel.ndim != rank + 2 or c != x.shape[-1]:
    raise ValueError(f"kernel {kernel.shape} does not fit input {x.shape}: "
                     f"expected [*window({rank} dims), D, {x.shape[-1]}]")
  if any(k % 2 == 0 for k in window):
    raise ValueError(f"window {window} must be odd in every axis")
  strides = tuple(int(s) for s in strides) if strides is not None else (1,) * rank
  pads = [((k - 1) // 2, (k - 1) // 2) for k in window]
  impl = resolve_depthwise_impl(impl)
  if impl == "xla":
    # Grouped-conv output channels are group-major: o = c * D + d.
    rhs = jnp.swapaxes(kernel.astype(x.dtype), -1, -2).reshape(*window, 1, c * d)
    dims = jax.lax.conv_dimension_numbers(x.shape, rhs.shape, _layouts(rank))
    y = jax.lax.conv_general_dilated(x, rhs, strides, pads, dimension_numbers=dims,
                                     feature_group_count=c)
    return jnp.swapaxes(y.reshape(*y.shape[:-1], c, d), -1, -2)
  # The kernel keeps its dtype here so that its gradient is accumulated in float32.
  return _shift_conv(x, kernel, strides)


# 'shift' formulation. Forward: one multiply-add of a shifted, strided input view per tap, in a
# fori_loop (unrolled, large windows compile much slower and run no faster on CPU).
# Reverse-mode autodiff through that loop saves a shifted input copy per tap and builds the
# kernel gradient as an einsum with C as a batch dimension, which XLA:CPU lowers to a
# transpose plus tiny matvecs per tap, many times the forward's cost. The custom VJP below
# keeps only (x, kernel): dx is the same kind of tap loop over the cotangent (one per stride
# phase, `_shift_input_grad`); dkernel is one `ones @ (view * g)` matvec per tap (a plain
# reduce over the leading axes is slower on XLA:CPU). See benchmarks/depthwise.py.
def _taps(window: Sequence[int]) -> Array:
  return jnp.asarray(list(itertools.product(*(range(k) for k in window))), jnp.int32)


def _tap_view(xp: Array, taps: Array, i: Array, size: Sequence[int],
              strides: Sequence[int]) -> Array:
  """xp[:, m + S * j, ...] for tap m = taps[i] and every output position j."""
  rank = len(strides)
  zero = jnp.zeros((), taps.dtype)  # every index one dtype (python ints are int64 under x64)
  start = (zero, *(taps[i, a] for a in range(rank)), *(zero,) * (xp.ndim - rank - 1))
  view = jax.lax.dynamic_slice(xp, start, (xp.shape[0], *size, *xp.shape[rank + 1:]))
  return view[(slice(None), *(slice(None, None, s) for s in strides))]


def _pad_spatial(a: Array, pads: Sequence[tuple[int, int, int]]) -> Array:
  """Zero-pads the grid axes of [B, *grid, ...] with (lo, hi, interior) per axis."""
  cfg = [(0, 0, 0), *pads, *((0, 0, 0),) * (a.ndim - len(pads) - 1)]
  return jax.lax.pad(a, jnp.zeros((), a.dtype), cfg)


def _shift_forward(x: Array, kernel: Array, strides: tuple[int, ...]) -> Array:
  rank = x.ndim - 2
  window = kernel.shape[:rank]
  d, c = kernel.shape[rank:]
  out = [conv_output_size(n, k, s) for n, k, s in zip(x.shape[1:-1], window, strides)]
  xp = _pad_spatial(x, [((k - 1) // 2, (k - 1) // 2, 0) for k in window])
  taps, kflat = _taps(window), kernel.astype(x.dtype).reshape(-1, d, c)
  size = [(o - 1) * s + 1 for o, s in zip(out, strides)]

  def tap(i, acc):
    return acc + _tap_view(xp, taps, i, size, strides)[..., None, :] * kflat[i]

  return jax.lax.fori_loop(0, kflat.shape[0], tap, jnp.zeros((x.shape[0], *out, d, c), x.dtype))


def _shift_input_grad(g: Array, kernel: Array, grid: Sequence[int],
                      strides: tuple[int, ...]) -> Array:
  """dx of the 'shift' conv: dx[i] = sum over (m, j) with S * j + m = i + pad of k[m] g[j].

  Polyphase: input positions i = S * q + r of one phase r take only the taps m = r + pad
  (mod S), each a shifted view of g at offset e = (r + pad - m) / S. So every phase is a
  stride-1 tap loop over the (undilated) cotangent and the whole costs the forward's MACs;
  dilating g and running the stride-1 loop cost S^2 times that (a 1x2x2 stride: 4x).
  """
  rank = len(grid)
  window = kernel.shape[:rank]
  d, c = kernel.shape[rank:]
  out = g.shape[1:-2]
  kflat = kernel.reshape(-1, d, c)
  phases = []  # (r, per-phase grid, [(flat tap, offsets e)])
  for r in itertools.product(*(range(s) for s in strides)):
    size = [len(range(ra, n, s)) for ra, n, s in zip(r, grid, strides)]
    per_axis = [[(m, (ra + (k - 1) // 2 - m) // s) for m in range(k)
                 if (ra + (k - 1) // 2 - m) % s == 0] for ra, k, s in zip(r, window, strides)]
    if min(size) == 0 or not all(per_axis):
      continue
    taps = [(int(np.ravel_multi_index([m for m, _ in t], window)), [e for _, e in t])
            for t in itertools.product(*per_axis)]
    phases.append((r, size, taps))
  # One zero-padding of g that covers every phase's offsets.
  lo = [max([0] + [-t[1][a] for _, _, ts in phases for t in ts]) for a in range(rank)]
  hi = [max([0] + [sz[a] - 1 + t[1][a] - (out[a] - 1) for _, sz, ts in phases for t in ts])
        for a in range(rank)]
  gp = _pad_spatial(g, [(l, h, 0) for l, h in zip(lo, hi)])
  dx = jnp.zeros((g.shape[0], *grid, c), g.dtype)
  for r, size, taps in phases:
    index = jnp.asarray([t[0] for t in taps], jnp.int32)
    starts = jnp.asarray([[e + l for e, l in zip(t[1], lo)] for t in taps], jnp.int32)

    def tap(i, acc, index=index, starts=starts, size=size):
      return acc + _tap_view(gp, starts, i, size, (1,) * rank) * kflat[index[i]]

    # Accumulate per (d, c) and sum D once after the loop: summing D inside the loop (a reduce,
    # or D static slices of the minor axes) made dx several times slower on XLA:CPU.
    acc = jax.lax.fori_loop(0, len(taps), tap, jnp.zeros((g.shape[0], *size, d, c), g.dtype))
    acc = sum(acc[..., j, :] for j in range(d))
    # Put phase r back at positions S * q + r (interior padding), and add the phases.
    dx = dx + _pad_spatial(acc, [(ra, n - 1 - ra - (sz - 1) * s, s - 1)
                                 for ra, n, sz, s in zip(r, grid, size, strides)])
  return dx


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shift_conv(x: Array, kernel: Array, strides: tuple[int, ...]) -> Array:
  return _shift_forward(x, kernel, strides)


def _shift_conv_fwd(x, kernel, strides):
  return _shift_forward(x, kernel, strides), (x, kernel)


def _shift_conv_bwd(strides, res, g):
  x, kernel = res
  rank = x.ndim - 2
  grid, window = x.shape[1:-1], kernel.shape[:rank]
  d, c = kernel.shape[rank:]
  out = g.shape[1:-2]
  g = g.astype(x.dtype)
  dx = _shift_input_grad(g, kernel.astype(x.dtype), grid, strides)
  # dkernel[m] = sum_{b,j} xpad[b, S * j + m] * g[b, j]: per tap, a matvec of ones with the
  # product (Eigen's matvec; XLA:CPU's reduce over leading axes is several times slower).
  xp = _pad_spatial(x, [((k - 1) // 2, (k - 1) // 2, 0) for k in window])
  size = [(o - 1) * s + 1 for o, s in zip(out, strides)]
  n = int(np.prod(g.shape[:-2]))
  ones = jnp.ones((n,), x.dtype)
  taps = _taps(window)

  acc = jnp.promote_types(x.dtype, jnp.float32)  # float64 under x64

  def dk_tap(i, dk):
    prod = (_tap_view(xp, taps, i, size, strides)[..., None, :] * g).reshape(n, d * c)
    row = jnp.dot(ones, prod, preferred_element_type=acc)
    return jax.lax.dynamic_update_slice(dk, row[None], (i, jnp.zeros_like(i)))

  dk = jax.lax.fori_loop(0, taps.shape[0], dk_tap, jnp.zeros((taps.shape[0], d * c), acc))
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_shift_conv.defvjp(_shift_conv_fwd, _shift_conv_bwd)


def _layouts(rank: int) -> tuple[str, str, str]:
  sp = "DHW"[-rank:] if rank <= 3 else None
  if sp is None:
    raise ValueError(f"grids of rank {rank} are not supported (1, 2 or 3)")
  return ("N" + sp + "C", sp + "IO", "N" + sp + "C")


def torch_conv(features: int, kernel: Sequence[int], strides: Sequence[int], padding: Any,
               fan_in: int, name: str, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32) -> nn.Conv:
  """nn.Conv with PyTorch's default init (the patch embeddings of every model)."""
  return nn.Conv(features, tuple(kernel), tuple(strides), padding=padding, dtype=dtype,
                 param_dtype=param_dtype, kernel_init=torch_conv_kernel_init,
                 bias_init=torch_conv_bias_init(fan_in), name=name)


class PatchEmbed(nn.Module):
  """The patch embedding of UniFormer and TimeSformer: a `proj` conv (stride = kernel in H, W
  by default), then with `norm` a LayerNorm(eps 1e-5) named `norm` (UniFormer)."""
  features: int
  kernel: Sequence[int]
  strides: Sequence[int]
  padding: Any = "VALID"
  norm: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = x.shape[-1] * int(np.prod(self.kernel))
    x = torch_conv(self.features, self.kernel, self.strides, self.padding, fan_in, "proj",
                   self.dtype, self.param_dtype)(x)
    if self.norm:
      x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="norm")(x)
    return x


class DepthwiseConv(nn.Module):
  """Depthwise conv with bias, 'same' padding. Kernel stored [*window, 1, C], the layout of
  flax nn.Conv(feature_group_count=C) (a PyTorch [C, 1, *window] weight transposed)."""
  kernel_size: int | Sequence[int]
  use_bias: bool = True
  impl: str = "auto"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    rank, c = x.ndim - 2, x.shape[-1]
    window = as_tuple(self.kernel_size, rank)
    fan_in = int(np.prod(window))
    kernel = self.param("kernel", torch_conv_kernel_init, (*window, 1, c), self.param_dtype)
    dtype = self.dtype or x.dtype
    y = depthwise_conv(x.astype(dtype), kernel, impl=self.impl)[..., 0, :]
    if self.use_bias:
      bias = self.param("bias", torch_conv_bias_init(fan_in), (c,), self.param_dtype)
      y = y + bias.astype(dtype)
    return y


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example (rng stream 'dropout')."""
  rate: float
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2 on the channel axis (also UniFormer's CMlp: 1x1 convs)."""
  hidden: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  conv_init: bool = False  # CMlp: 1x1 convs keep PyTorch's conv init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    if self.conv_init:
      inits = [dict(kernel_init=torch_conv_kernel_init, bias_init=torch_conv_bias_init(fan))
               for fan in (c, self.hidden)]
    else:
      inits = [dict(kernel_init=trunc_normal_02, bias_init=nn.initializers.zeros)] * 2
    x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1",
                 **inits[0])(x)
    x = gelu(x)
    return nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2", **inits[1])(x)


def layer_scale(module: nn.Module, name: str, x: Array, enabled: bool, init: float = 1e-6) -> Array:
  """x * gamma (per channel) when enabled; the official gamma_1 / gamma_2."""
  if not enabled:
    return x
  gamma = module.param(name, nn.initializers.constant(init), (x.shape[-1],), jnp.float32)
  return x * gamma.astype(x.dtype)
