"""`layers.depthwise_conv`: the 'shift' formulation (custom VJP) against 'xla' and against
autodiff of a plain reference, forward and gradients w.r.t. input and kernel."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structvit_jax.models import layers

FAST_COMPILES = True  # XLA's cheap compile mode (conftest.py): small programs, each compiled once


def _reference(x, kernel, strides):
  """Sum over taps of static strided slices of the padded input (autodiff-able, no loop)."""
  rank = x.ndim - 2
  window = kernel.shape[:rank]
  xp = jnp.pad(x, [(0, 0), *(((k - 1) // 2,) * 2 for k in window), (0, 0)])
  out = [(n - 1) // s + 1 for n, s in zip(x.shape[1:-1], strides)]
  y = 0.0
  for m in itertools.product(*(range(k) for k in window)):
    view = xp[(slice(None), *(slice(mm, mm + (o - 1) * s + 1, s)
                              for mm, o, s in zip(m, out, strides)))]
    y = y + view[..., None, :] * kernel[m].astype(x.dtype)
  return y


CASES = [  # (grid, window, D, strides)
    ((9,), (3,), 1, (1,)),
    ((9,), (5,), 3, (2,)),
    ((5, 6), (3, 5), 1, (1, 1)),
    ((6, 7), (5, 3), 3, (2, 2)),
    ((3, 5, 4), (3, 3, 3), 3, (1, 2, 2)),
    ((4, 6, 5), (5, 3, 1), 1, (1, 1, 1)),
    ((3, 6, 7), (3, 5, 5), 1, (1, 2, 2)),
]


def _value_and_grads(fn, x, kernel, g):
  loss = lambda x, k: jnp.sum(fn(x, k).astype(jnp.float32) * g.astype(jnp.float32))
  return jax.jit(lambda x, k: (fn(x, k), *jax.grad(loss, (0, 1))(x, k)))(x, kernel)


@pytest.mark.parametrize("grid,window,d,strides", CASES)
def test_shift_matches_xla_and_reference_fp32(grid, window, d, strides):
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(len(grid) * 10 + d), 3)
  x = jax.random.normal(kx, (2, *grid, 4))
  kernel = jax.random.normal(kk, (*window, d, 4))
  out = [(n - 1) // s + 1 for n, s in zip(grid, strides)]
  g = jax.random.normal(kg, (2, *out, d, 4))
  shift = lambda x, k: layers.depthwise_conv(x, k, strides, "shift")
  got = _value_and_grads(shift, x, kernel, g)
  for impl in (lambda x, k: layers.depthwise_conv(x, k, strides, "xla"),
               lambda x, k: _reference(x, k, strides)):
    want = _value_and_grads(impl, x, kernel, g)
    for name, a, b in zip(("y", "dx", "dkernel"), got, want):
      assert a.shape == b.shape and a.dtype == b.dtype, name
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("grid,window,d,strides", [CASES[1], CASES[3], CASES[4]])
def test_shift_bf16_input_close_to_fp32_and_kernel_grad_keeps_fp32(grid, window, d, strides):
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.random.normal(kx, (2, *grid, 4))
  kernel = jax.random.normal(kk, (*window, d, 4))  # parameters stay float32
  out = [(n - 1) // s + 1 for n, s in zip(grid, strides)]
  g = jax.random.normal(kg, (2, *out, d, 4))
  fn = lambda x, k: layers.depthwise_conv(x, k, strides, "shift")
  got = _value_and_grads(fn, x.astype(jnp.bfloat16), kernel, g.astype(jnp.bfloat16))
  want = _value_and_grads(fn, x, kernel, g)
  assert got[0].dtype == got[1].dtype == jnp.bfloat16 and got[2].dtype == jnp.float32
  for name, a, b in zip(("y", "dx", "dkernel"), got, want):
    scale = float(jnp.abs(b).max())
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.05 * scale, err_msg=name)


def test_shift_backward_keeps_no_per_tap_copies():
  # Autodiff through the tap loop saved a shifted input copy per tap (125 for 5x5x5); the
  # custom VJP saves only x and the kernel. Bound the compiled scratch to a few padded inputs.
  x = jnp.ones((1, 4, 8, 8, 16))
  kernel = jnp.ones((5, 5, 5, 1, 16))
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(layers.depthwise_conv(x, k, impl="shift")),
                          (0, 1)))
  temp = grad.lower(x, kernel).compile().memory_analysis().temp_size_in_bytes
  assert temp < 40 * x.nbytes, f"{temp} bytes of scratch for a {x.nbytes}-byte input"
