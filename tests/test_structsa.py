"""StructSA: fused == reference == the equations; identity init == SA; memory of the fused path."""

import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structvit_jax.models import layers
from structvit_jax.models.structsa import StructSA, StructSAConfig

FAST_COMPILES = True  # XLA's cheap compile mode (conftest.py): small programs, each compiled once

C, HEADS = 16, 2


def _module(**kw):
  return StructSA(num_heads=HEADS, structsa=StructSAConfig(init_noise=0.5, **kw))


def _form(m, form):
  return m.clone(structsa=m.structsa.replace(form=form))


def _init(m, x, extra=None, seed=0):
  """Params at O(1) scale so that differences are not hidden by tiny outputs."""
  v = m.init(jax.random.PRNGKey(seed), x, extra)
  keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 16))
  def rescale(path, p):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      return jax.random.normal(next(keys), p.shape) / np.sqrt(p.shape[0])
    if "bias" in name:
      return 0.1 * jax.random.normal(next(keys), p.shape)
    return p
  return jax.tree_util.tree_map_with_path(rescale, v)


def _inputs(grid, extra, seed=3):
  x = jax.random.normal(jax.random.PRNGKey(seed), (2, *grid, C))
  e = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, extra, C)) if extra else None
  return x, e


def numpy_structsa(params, x, extra, d, stride, aggregation, window=3):
  """Eq. 2-5 with explicit loops over queries, key sites, structure channels and taps."""
  x = np.asarray(x, np.float64)
  b, *grid, c = x.shape
  rank, hd = len(grid), c // HEADS
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  tokens = x.reshape(b, -1, c)
  e = 0 if extra is None else extra.shape[1]
  if e:
    tokens = np.concatenate([np.asarray(extra, np.float64), tokens], 1)
  qkv = tokens @ p["qkv"]["kernel"] + p["qkv"]["bias"]
  q, k, v = (qkv[..., i * c:(i + 1) * c] for i in range(3))
  q = q / np.sqrt(hd)
  kg, vg = k[:, e:].reshape(b, *grid, c), v[:, e:].reshape(b, *grid, c)
  strides = [1 if a < rank - 2 else stride for a in range(rank)]
  out_grid = [(g - 1) // s + 1 for g, s in zip(grid, strides)]
  wk = (window,) * rank
  wv = wk if aggregation == "context" else (1,) * rank

  def conv_at(t, kern, j):  # sum_m kern[m] * t[S j + m - pad] (zero outside), per channel
    acc = np.zeros(kern.shape[-2:])
    for m in itertools.product(*(range(w) for w in kern.shape[:rank])):
      pos = [s * jj + mm - (w - 1) // 2 for s, jj, mm, w in zip(strides, j, m, kern.shape[:rank])]
      if all(0 <= q_ < g for q_, g in zip(pos, grid)):
        acc += kern[m] * t[tuple(pos)]
    return acc  # [D, C]

  y = np.zeros((b, tokens.shape[1], c))
  for bi in range(b):
    sites = list(itertools.product(*(range(o) for o in out_grid)))
    if d:
      kt = np.stack([conv_at(kg[bi], p["u_k"], j) for j in sites])  # [N', D, C]
      vt = np.stack([conv_at(vg[bi], p["u_v"], j) for j in sites])
      keys = np.concatenate([np.repeat(k[bi, :e, None], d, 1), kt], 0).reshape(-1, c)
      vals = np.concatenate([np.repeat(v[bi, :e, None], d, 1), vt], 0).reshape(-1, c)
    else:
      keys, vals = k[bi], v[bi]
    for h in range(HEADS):
      sl = slice(h * hd, (h + 1) * hd)
      s = q[bi, :, sl] @ keys[:, sl].T
      a = np.exp(s - s.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      y[bi, :, sl] = a @ vals[:, sl]
  y = y @ p["proj"]["kernel"] + p["proj"]["bias"]
  return y[:, e:].reshape(b, *grid, c), y[:, :e]


CASES = [(grid, d, s, agg) for grid in [(5, 7), (3, 5, 5)] for d in (1, 4) for s in (1, 2)
         for agg in ("context", "element")]


@pytest.mark.parametrize("grid,d,stride,agg", CASES)
def test_fused_equals_reference_values_and_grads(grid, d, stride, agg):
  m = _module(d=d, stride=stride, aggregation=agg)
  x, e = _inputs(grid, extra=1 if len(grid) == 2 else 0)
  params = _init(m, x, e)

  def loss(impl, params, x):
    out = _form(m, impl).apply(params, x, e)
    y = out[0] if e is not None else out
    return jnp.sum(jnp.sin(y)) + (jnp.sum(out[1] ** 2) if e is not None else 0.0), out

  (lf, yf), gf = jax.jit(jax.value_and_grad(lambda p, x: loss("fused", p, x), (0, 1), has_aux=True))(params, x)
  (lr, yr), gr = jax.jit(jax.value_and_grad(lambda p, x: loss("reference", p, x), (0, 1), has_aux=True))(params, x)
  for a, b in zip(jax.tree.leaves(yf), jax.tree.leaves(yr)):
    assert np.abs(np.asarray(a)).max() > 0.1  # outputs are O(1), so 1e-5 means something
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gr)):
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(b).max())), rtol=0)


@pytest.mark.parametrize("grid,d,stride,agg,extra", [
    ((4, 5), 2, 1, "context", 1), ((5, 5), 3, 2, "element", 0), ((3, 3, 4), 2, 2, "context", 0),
    ((7,), 2, 2, "context", 1), ((4, 5), 0, 1, "context", 1)])
def test_both_implementations_match_the_equations(grid, d, stride, agg, extra):
  m = _module(d=d, stride=stride, aggregation=agg)
  x, e = _inputs(grid, extra)
  params = _init(m, x, e)
  want_grid, want_extra = numpy_structsa(params, x, e, d, stride, agg)
  for impl in ("fused", "reference"):
    out = jax.jit(_form(m, impl).apply)(params, x, e)
    got_grid, got_extra = (out if e is not None else (out, np.zeros_like(want_extra)))
    np.testing.assert_allclose(got_grid, want_grid, atol=2e-5, err_msg=impl)
    np.testing.assert_allclose(got_extra, want_extra, atol=2e-5, err_msg=impl)


@pytest.mark.parametrize("grid,extra", [((6, 7), 0), ((6, 7), 1), ((3, 4, 5), 0)])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_centre_tap_init_equals_sa(grid, extra, impl):
  x, e = _inputs(grid, extra)
  sa = StructSA(num_heads=HEADS, structsa=StructSAConfig(d=0, form=impl))
  ssa = StructSA(num_heads=HEADS, structsa=StructSAConfig(d=4, init="centre", init_noise=0.0,
                                                          form=impl))
  p_sa = _init(sa, x, e)
  p_ssa = ssa.init(jax.random.PRNGKey(9), x, e)
  u = p_ssa["params"]
  centre = tuple(k // 2 for k in u["u_k"].shape[:-2])
  assert np.all(u["u_k"][centre] == 1) and float(np.abs(u["u_k"]).sum()) == u["u_k"][centre].size
  p_ssa = {"params": {**p_sa["params"], "u_k": u["u_k"], "u_v": u["u_v"]}}
  for a, b in zip(jax.tree.leaves(sa.apply(p_sa, x, e)), jax.tree.leaves(ssa.apply(p_ssa, x, e))):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-6)


def test_sa_matches_plain_softmax_attention():
  x, _ = _inputs((4, 4), 0)
  m = StructSA(num_heads=HEADS, structsa=StructSAConfig(d=0))
  p = _init(m, x)
  y = m.apply(p, x)
  want, _ = numpy_structsa(p, x, None, 0, 1, "context")
  np.testing.assert_allclose(y, want, atol=1e-5)


@pytest.mark.parametrize("bad,msg", [(dict(aggregation="nope"), "aggregation"),
                                     (dict(kernel_size=4), "odd"), (dict(d=-1), "D=-1"),
                                     (dict(form="x"), "form"),
                                     (dict(attention_impl="flash"), "attention_impl"),
                                     (dict(depthwise_impl="fft"), "depthwise_impl"),
                                     (dict(stride=0), "stride")])
def test_invalid_configurations_raise_clear_errors(bad, msg):
  x, _ = _inputs((4, 4), 0)
  with pytest.raises(ValueError, match=msg):
    StructSA(num_heads=HEADS, structsa=StructSAConfig(**{"d": 2, **bad})).init(
        jax.random.PRNGKey(0), x)


def test_invalid_values_are_listed_with_the_valid_ones():
  with pytest.raises(ValueError, match="form='x'; valid: fused, reference"):
    StructSAConfig(form="x")
  with pytest.raises(ValueError, match="valid: auto, xla, cudnn, pallas_tpu"):
    StructSAConfig(attention_impl="flash")


def test_stride_without_structure_is_an_error():
  """SA (D = 0) attends the unstrided grid, so a stride there would be silently ignored."""
  with pytest.raises(ValueError, match="stride=2 needs D > 0"):
    StructSAConfig(d=0, stride=2)
  assert StructSAConfig(d=1, stride=2).stride == 2


def test_config_from_json_values():
  """model.json gives kernel_size as a list."""
  cfg = StructSAConfig(d=2, kernel_size=[1, 3, 3])
  assert cfg.kernel_size == (1, 3, 3)
  hash(cfg)  # a flax module field


_X64 = """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
from structvit_jax.models.structsa import StructSA, StructSAConfig
rng = np.random.RandomState(0)
for grid, extra in (((5, 6), 1), ((3, 4, 4), 0)):
  x = rng.randn(2, *grid, 16)
  e = rng.randn(2, extra, 16) if extra else None
  as_ = lambda a, t: None if a is None else jnp.asarray(a, t)
  for dw in ("shift", "xla"):
    for form in ("fused", "reference"):
      m = StructSA(2, StructSAConfig(d=3, stride=2, init="centre", init_noise=0.5, form=form,
                                     depthwise_impl=dw))
      v = jax.jit(m.init)(jax.random.PRNGKey(0), as_(x, jnp.float32), as_(e, jnp.float32))
      v = jax.tree.map(lambda p: p * 5.0 if p.ndim == 2 else p, v)  # qkv, proj: O(1) outputs
      apply = jax.jit(m.apply)  # one compile per dtype: far faster than op-by-op here
      y32 = jax.tree.leaves(apply(v, as_(x, jnp.float32), as_(e, jnp.float32)))
      y64 = jax.tree.leaves(apply(v, as_(x, jnp.float64), as_(e, jnp.float64)))
      assert all(a.dtype == jnp.float64 for a in y64), form
      assert max(float(np.abs(a).max()) for a in y64) > 0.1
      for a, b in zip(y32, y64):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"{form} {dw}")
      g = jax.jit(jax.grad(lambda v: sum(jnp.sum(y) for y in jax.tree.leaves(
          m.apply(v, as_(x, jnp.float64), as_(e, jnp.float64))))))(v)
      assert all(np.isfinite(l).all() for l in jax.tree.leaves(g))
print("ok")
"""


def test_both_forms_run_in_x64_and_match_float32():
  """Under jax_enable_x64 (in a subprocess: the flag is global), float64 inputs give the
  float32 results of both forms and both depthwise formulations, and gradients."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  r = subprocess.run([sys.executable, "-c", _X64], env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_depthwise_formulations_agree_with_numpy():
  rng = np.random.default_rng(0)
  for grid, window, strides in [((9,), (3,), (2,)), ((5, 6), (3, 5), (1, 2)),
                                ((3, 5, 4), (3, 3, 3), (1, 2, 2))]:
    x = rng.normal(size=(2, *grid, 4)).astype(np.float32)
    kern = rng.normal(size=(*window, 3, 4)).astype(np.float32)
    out = [np.asarray(layers.depthwise_conv(jnp.asarray(x), jnp.asarray(kern), strides, impl))
           for impl in ("xla", "shift")]
    # numpy: pad then take strided windows
    pads = [(0, 0)] + [((w - 1) // 2,) * 2 for w in window] + [(0, 0)]
    xp = np.pad(x, pads)
    og = [(g - 1) // s + 1 for g, s in zip(grid, strides)]
    want = np.zeros((2, *og, 3, 4), np.float32)
    for j in itertools.product(*(range(o) for o in og)):
      for m in itertools.product(*(range(w) for w in window)):
        pos = tuple(s * jj + mm for s, jj, mm in zip(strides, j, m))
        want[(slice(None), *j)] += xp[(slice(None), *pos)][:, None, :] * kern[m]
    for o in out:
      np.testing.assert_allclose(o, want, atol=1e-5)


def _max_intermediate(fn, *args) -> int:
  jaxpr = jax.make_jaxpr(fn)(*args)
  best = 0
  def walk(j):
    nonlocal best
    for eqn in j.eqns:
      for v in eqn.outvars:
        best = max(best, int(np.prod(v.aval.shape)))
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else [p]):
          if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)
          elif hasattr(sub, "eqns"):
            walk(sub)
  walk(jaxpr.jaxpr)
  return best


def test_fused_builds_nothing_larger_than_the_scores():
  grid, d, b, c, heads = (4, 7, 7), 4, 2, 64, 2
  x = jnp.zeros((b, *grid, c))
  n = int(np.prod(grid))
  scores = b * heads * n * n * d
  for stride in (1, 2):
    m = StructSA(num_heads=heads, structsa=StructSAConfig(d=d, stride=stride))
    p = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x))
    fused = _max_intermediate(lambda p, x: m.apply(p, x), p, x)
    assert fused <= scores
    ref = _max_intermediate(lambda p, x: _form(m, "reference").apply(p, x), p, x)
    assert ref >= b * n * n * c // stride ** 2  # the literal form builds N x N x C correlations
