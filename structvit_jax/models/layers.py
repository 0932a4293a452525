"""Building blocks shared by the models: depthwise convolution, drop path, MLPs, inits.

Depthwise convolution is the one primitive whose formulation matters per backend: XLA:CPU
runs `conv_general_dilated(feature_group_count=C)` 10-200x slower than the same sum of
shifted multiply-adds (../shared/STACK.md G4), so `depthwise_conv` picks the formulation by
backend. UniFormer's position / local convolutions and StructSA's key / value convolutions
(channel multiplier D) all go through it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

# Formulations of the depthwise convolution. 'auto': 'shift' on CPU, 'xla' elsewhere
# (the GPU choice is measured in benchmarks/).
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
    raise ValueError(f"depthwise_impl={impl!r}; valid: {DEPTHWISE_IMPLS}")
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
  strides = tuple(strides) if strides is not None else (1,) * rank
  pads = [((k - 1) // 2, (k - 1) // 2) for k in window]
  impl = resolve_depthwise_impl(impl)
  kernel = kernel.astype(x.dtype)
  if impl == "xla":
    # Grouped-conv output channels are group-major: o = c * D + d.
    rhs = jnp.swapaxes(kernel, -1, -2).reshape(*window, 1, c * d)
    dims = jax.lax.conv_dimension_numbers(x.shape, rhs.shape, _layouts(rank))
    y = jax.lax.conv_general_dilated(x, rhs, strides, pads, dimension_numbers=dims,
                                     feature_group_count=c)
    return jnp.swapaxes(y.reshape(*y.shape[:-1], c, d), -1, -2)
  # 'shift': one multiply-add of a shifted, strided input view per tap, in a fori_loop
  # (unrolled, a 5x5x5 window compiled 5-10x slower and ran no faster; measured on CPU).
  out = [conv_output_size(n, k, s) for n, k, s in zip(x.shape[1:-1], window, strides)]
  xp = jnp.pad(x, [(0, 0), *pads, (0, 0)])
  taps = jnp.asarray(list(itertools.product(*(range(k) for k in window))), jnp.int32)
  kflat = kernel.reshape(-1, d, c)
  size = (x.shape[0], *((o - 1) * s + 1 for o, s in zip(out, strides)), c)
  every = (slice(None), *(slice(None, None, s) for s in strides))

  def tap(i, acc):
    start = (0, *(taps[i, a] for a in range(rank)), 0)
    view = jax.lax.dynamic_slice(xp, start, size)[every]
    return acc + view[..., None, :] * kflat[i]

  return jax.lax.fori_loop(0, kflat.shape[0], tap, jnp.zeros((x.shape[0], *out, d, c), x.dtype))


def _layouts(rank: int) -> tuple[str, str, str]:
  sp = "DHW"[-rank:] if rank <= 3 else None
  if sp is None:
    raise ValueError(f"grids of rank {rank} are not supported (1, 2 or 3)")
  return ("N" + sp + "C", sp + "IO", "N" + sp + "C")


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
