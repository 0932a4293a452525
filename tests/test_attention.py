"""structvit_jax.models.attention: backend choice (pure, any backend) and the CPU-runnable
paths (XLA; the Pallas TPU kernel in TPU interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structvit_jax.models import attention as attn

FAST_COMPILES = True  # XLA's cheap compile mode (conftest.py): small programs, each compiled once

BF16, F32, F16 = jnp.bfloat16, jnp.float32, jnp.float16


def qkv(b=2, nq=12, nk=20, h=2, hd=16, dtype=F32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (b, nq, h, hd), dtype),
          jax.random.normal(ks[1], (b, nk, h, hd), dtype),
          jax.random.normal(ks[2], (b, nk, h, hd), dtype))


def reference(q, k, v):
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)


# ----------------------------------------------------------------------------- decisions


@pytest.mark.parametrize("q_shape,dtype,cc,want,why", [
    ((8, 197, 12, 64), BF16, (9, 0), "cudnn", "cuDNN"),
    ((8, 197, 12, 64), F16, (8, 0), "cudnn", "cuDNN"),
    ((8, 197, 12, 64), F32, (9, 0), "xla", "bfloat16 or float16"),
    ((8, 197, 12, 60), BF16, (9, 0), "xla", "multiple of 8"),
    ((8, 197, 2, 192), BF16, (9, 0), "cudnn", "cuDNN"),    # Hopper: head_dim <= 256
    ((8, 197, 2, 192), BF16, (8, 0), "xla", "<= 128"),     # Ampere: <= 128
    ((8, 197, 2, 192), BF16, None, "xla", "<= 128"),       # unknown GPU: conservative
    ((8, 197, 12, 64), BF16, (7, 0), "xla", "sm80"),
])
def test_choose_gpu(q_shape, dtype, cc, want, why):
  k_shape = (q_shape[0], 49, *q_shape[2:])  # Nq != Nk is fine for cuDNN
  impl, reason = attn.choose_implementation("gpu", q_shape, k_shape, dtype, None,
                                            compute_capability=cc)
  assert impl == want and why in reason, (impl, reason)
  assert attn.choose_implementation("gpu", q_shape, k_shape, dtype, "auto",
                                    compute_capability=cc)[0] == want


def test_choose_gpu_rocm_and_forced():
  shape = (2, 256, 4, 64)
  assert attn.choose_implementation("gpu", shape, shape, BF16, cuda=False)[0] == "xla"
  assert attn.choose_implementation("gpu", shape, shape, BF16, "xla")[0] == "xla"
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    attn.choose_implementation("gpu", shape, shape, F32, "cudnn")


@pytest.mark.parametrize("q_shape,k_shape,dtype,devices,mesh,want,why", [
    ((8, 256, 12, 64), (8, 256, 12, 64), BF16, 1, None, "pallas_tpu", "Pallas"),
    ((8, 197, 12, 64), (8, 197, 12, 64), F32, 1, None, "pallas_tpu", "197->256"),
    ((8, 16, 12, 64), (8, 16, 12, 64), BF16, 1, None, "xla", "attention work"),  # 64x padding
    ((8, 256, 2, 192), (8, 256, 2, 192), BF16, 1, None, "xla", "multiple of 128"),
    ((8, 256, 2, 256), (8, 256, 2, 256), BF16, 1, None, "pallas_tpu", "Pallas"),
    ((8, 256, 12, 64), (8, 256, 12, 64), F16, 1, None, "xla", "float16"),
    ((8, 256, 12, 64), (8, 256, 12, 64), BF16, 4, None, "xla", "jax.set_mesh"),
    ((8, 256, 12, 64), (8, 256, 12, 64), BF16, 4, {"data": 4}, "pallas_tpu", "Pallas"),
    ((6, 256, 12, 64), (6, 256, 12, 64), BF16, 4, {"data": 4}, "xla", "not divisible"),
    ((8, 256, 12, 64), (8, 256, 6, 64), BF16, 1, None, "xla", "share batch, heads"),
])
def test_choose_tpu(q_shape, k_shape, dtype, devices, mesh, want, why):
  impl, reason = attn.choose_implementation("tpu", q_shape, k_shape, dtype, None,
                                            num_devices=devices, mesh_axes=mesh)
  assert impl == want and why in reason, (impl, reason)


def test_choose_cpu_and_bad_requests():
  shape = (2, 256, 4, 64)
  impl, reason = attn.choose_implementation("cpu", shape, shape, BF16, None)
  assert impl == "einsum" and "CPU" in reason
  assert attn.choose_implementation("cpu", shape, shape, BF16, "xla")[0] == "xla"
  for backend in ("gpu", "tpu"):  # 'einsum' is only the CPU default; it runs anywhere forced
    assert attn.choose_implementation(backend, shape, shape, BF16, "einsum")[0] == "einsum"
  assert attn.choose_implementation("rocm", shape, shape, BF16, None)[0] == "xla"
  with pytest.raises(ValueError, match="needs a GPU backend"):
    attn.choose_implementation("cpu", shape, shape, BF16, "cudnn")
  with pytest.raises(ValueError, match="needs a TPU backend"):
    attn.choose_implementation("gpu", shape, shape, BF16, "pallas_tpu")
  with pytest.raises(ValueError, match="not one of"):
    attn.choose_implementation("tpu", shape, shape, BF16, "flash")
  with pytest.raises(ValueError, match="cannot run these inputs"):
    attn.choose_implementation("tpu", shape, (2, 256, 4, 192), BF16, "pallas_tpu")


# ----------------------------------------------------------------------------- CPU runs


def test_xla_path_equals_jax_nn():
  q, k, v = qkv()
  got = jax.jit(lambda q, k, v: attn.dot_product_attention(q, k, v, "xla"))(q, k, v)
  want = jax.jit(jax.nn.dot_product_attention)(q, k, v)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # same XLA program
  np.testing.assert_allclose(got, reference(q, k, v), atol=1e-5)


@pytest.mark.parametrize("impl", [None, "auto", "einsum"])
@pytest.mark.parametrize("shape", [(2, 12, 20, 2, 16), (3, 7, 29, 1, 8)])  # b, nq, nk, h, hd
def test_cpu_einsum_equals_jax_nn_values_and_gradients(impl, shape):
  """The CPU default (the custom-VJP einsum attention) against jax.nn's XLA attention:
  outputs and the gradients w.r.t. q, k and v."""
  b, nq, nk, h, hd = shape
  q, k, v = qkv(b, nq, nk, h, hd, seed=nq)
  w = jax.random.normal(jax.random.PRNGKey(7), q.shape)
  loss = lambda f: lambda q, k, v: (f(q, k, v) * w).sum()
  ours = lambda q, k, v: attn.dot_product_attention(q, k, v, impl)
  theirs = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(jax.jit(ours)(q, k, v), jax.jit(theirs)(q, k, v), atol=1e-6,
                             rtol=1e-5)
  got = jax.jit(jax.grad(loss(ours), (0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(loss(theirs), (0, 1, 2)))(q, k, v)
  for g, wnt in zip(got, want):
    assert float(jnp.abs(wnt).max()) > 0
    np.testing.assert_allclose(g, wnt, atol=1e-5, rtol=1e-5)


def test_cpu_einsum_bfloat16_and_float64():
  """bf16 inputs give bf16 outputs close to the float32 result; float64 (x64) stays float64."""
  q, k, v = qkv()
  want = reference(q, k, v)
  b16 = [x.astype(BF16) for x in (q, k, v)]
  got = attn.einsum_attention(*b16)
  assert got.dtype == BF16
  np.testing.assert_allclose(got.astype(F32), want, atol=5e-2)
  gb = jax.grad(lambda *a: attn.einsum_attention(*a).astype(F32).sum(), (0, 1, 2))(*b16)
  assert all(g.dtype == BF16 for g in gb)
  with jax.enable_x64(True):
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    got = attn.einsum_attention(jnp.asarray(q64), jnp.asarray(k64), jnp.asarray(v64))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, reference(q64, k64, v64), atol=1e-12)


def test_explicit_cudnn_on_cpu_raises():
  q, k, v = qkv()
  with pytest.raises(ValueError, match="'cudnn' needs a GPU backend"):
    attn.dot_product_attention(q, k, v, "cudnn")
  with pytest.raises(ValueError, match="'pallas_tpu' needs a TPU backend"):
    attn.dot_product_attention(q, k, v, "pallas_tpu")


def test_xla_gradients_flow():
  q, k, v = qkv()
  loss = lambda f: lambda q, k, v: (f(q, k, v) ** 2).sum()
  got = jax.grad(loss(lambda *a: attn.dot_product_attention(*a, "auto")), (0, 1, 2))(q, k, v)
  want = jax.grad(loss(reference), (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    assert float(jnp.abs(g).max()) > 0
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_logs_once_per_shape(monkeypatch):
  calls = []
  monkeypatch.setattr(attn.logging, "log", lambda level, msg, *a: calls.append(a))
  monkeypatch.setattr(attn, "_logged", set())
  q, k, v = qkv(nq=7)
  for _ in range(3):
    attn.dot_product_attention(q, k, v)
  assert len(calls) == 1 and calls[0][3] == "einsum"
  attn.dot_product_attention(*qkv(nq=9))
  assert len(calls) == 2


def test_pallas_tpu_kernel_interpret_matches():
  """The real Pallas TPU kernel, run in TPU interpret mode on CPU: the [B,N,H,hd] <->
  [B,H,N,hd] transposes, the padding of Nq 40 / Nk 72 to 128 with the padded keys masked by
  segment ids, sm_scale and the gradient (the kernel's own backward)."""
  from jax.experimental.pallas import tpu as pltpu
  q, k, v = qkv(b=1, nq=40, nk=72, h=1, hd=8, seed=1)
  w = jax.random.normal(jax.random.PRNGKey(3), q.shape)
  f = lambda q, k, v: attn.dot_product_attention(q, k, v, "pallas_tpu", interpret=True)
  with pltpu.force_tpu_interpret_mode():  # the kernel's backward is traced in here
    out, vjp = jax.vjp(f, q, k, v)
    got = vjp(w)
  want_out, want_vjp = jax.vjp(reference, q, k, v)
  np.testing.assert_allclose(out, want_out, atol=2e-5)
  for g, r in zip(got, want_vjp(w)):
    np.testing.assert_allclose(g, r, atol=5e-5)


def test_pallas_tpu_interpret_under_mesh_uses_shard_map():
  """With a mesh in context the kernel runs per batch shard (GSPMD cannot partition a
  Mosaic call); 4 CPU devices, batch 4 sharded over 'data'."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:4])
  q, k, v = qkv(b=4, nq=128, nk=128, h=1, hd=8, seed=2)
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    f = jax.jit(lambda q, k, v: attn.dot_product_attention(q, k, v, "pallas_tpu",
                                                           interpret=True))
    jaxpr = str(jax.make_jaxpr(f)(q, k, v))
    out = f(put(q), put(k), put(v))
  assert "shard_map" in jaxpr
  np.testing.assert_allclose(out, reference(q, k, v), atol=2e-5)
