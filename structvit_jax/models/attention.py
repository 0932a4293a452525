"""Multi-head dot-product attention with the fast kernel of each backend.

`dot_product_attention(q, k, v, implementation)` takes the layout of
`jax.nn.dot_product_attention` (q [B, Nq, H, hd], k / v [B, Nk, H, hd]) and the scale
1/sqrt(hd), and runs cuDNN flash attention on GPU, the Pallas flash kernel on TPU (sequences
padded to multiples of 128, padded keys masked by segment ids; inside `jax.shard_map` on
more than one device), on CPU 'einsum' (XLA einsums in the [B, H, N, hd] layout with a
hand-written backward, `einsum_attention`) and `jax.nn.dot_product_attention`'s XLA path
otherwise. The choice is the pure function
`choose_implementation` (testable for any backend on CPU); `dot_product_attention` logs it
once per distinct (backend, shapes, dtype, request) at trace time. The kernels' constraints:
docs/platform_notes.md, "Attention kernels".
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# The attention kernel switch (StructSAConfig.attention_impl, TimeSformer.attention_impl).
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas_tpu", "einsum")

# Pallas TPU flash attention: every block 128 (jax's BlockSizes.get_default); sequences
# are padded to multiples of this.
PALLAS_BLOCK = 128
# Padding to 128-multiples may at most double the attention work; beyond that (short
# sequences) XLA's fused attention is the better choice.
PALLAS_MAX_PAD_FACTOR = 2.0

_logged: set = set()
_logged_lock = threading.Lock()


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def choose_implementation(backend: str, q_shape: Sequence[int], k_shape: Sequence[int],
                          dtype: Any, requested: str | None = None, *,
                          compute_capability: tuple[int, int] | None = None,
                          cuda: bool = True, num_devices: int = 1,
                          mesh_axes: dict[str, int] | None = None) -> tuple[str, str]:
  """Which attention implementation to run, and why: (impl, reason).

  Args:
    backend: jax.default_backend(): 'cpu', 'gpu' or 'tpu'.
    q_shape, k_shape: [B, Nq, H, hd] and [B, Nk, H, hd].
    dtype: the q/k/v dtype.
    requested: None / 'auto' (pick), or 'xla' / 'cudnn' / 'pallas_tpu' / 'einsum' (forced).
    compute_capability: GPU (major, minor); None = unknown, assume pre-Hopper limits.
    cuda: False on ROCm GPUs (no cuDNN).
    num_devices: devices the computation spans (Pallas needs shard_map beyond one).
    mesh_axes: the mesh in context ({name: size}), if any (jax.set_mesh).

  Returns:
    impl in {'xla', 'cudnn', 'pallas_tpu', 'einsum'} and a one-line reason.

  Raises:
    ValueError: an unknown request, or a forced 'cudnn' / 'pallas_tpu' that cannot run
      here (wrong backend or unsupported inputs).
  """
  requested = "auto" if requested is None else requested
  if requested not in ATTENTION_IMPLS:
    raise ValueError(f"attention implementation {requested!r} is not one of {ATTENTION_IMPLS} "
                     "(None means 'auto').")
  if requested in ("xla", "einsum"):
    return requested, f"requested {requested!r}"
  if requested == "cudnn" and backend != "gpu":
    raise ValueError(f"attention implementation 'cudnn' needs a GPU backend, but the backend is "
                     f"{backend!r}; use attention_impl='auto' or 'xla'.")
  if requested == "pallas_tpu" and backend != "tpu":
    raise ValueError(f"attention implementation 'pallas_tpu' needs a TPU backend, but the backend "
                     f"is {backend!r}; use attention_impl='auto' or 'xla' (tests: interpret=True).")
  if backend == "gpu":
    why_not = _cudnn_unsupported(q_shape, k_shape, dtype, compute_capability, cuda)
    if why_not is None:
      return "cudnn", (f"cuDNN flash attention (q {tuple(q_shape)}, k {tuple(k_shape)}, "
                       f"{np.dtype(dtype).name})")
    if requested == "cudnn":
      raise ValueError(f"attention implementation 'cudnn' cannot run these inputs: {why_not}")
    return "xla", f"cuDNN flash attention unsupported: {why_not}"
  if backend == "tpu":
    why_not = _pallas_unsupported(q_shape, k_shape, dtype, num_devices, mesh_axes)
    if why_not is None:
      nq, nk = q_shape[1], k_shape[1]
      pad = ""
      if nq % PALLAS_BLOCK or nk % PALLAS_BLOCK:
        pad = (f", padded Nq {nq}->{_round_up(nq, PALLAS_BLOCK)}, "
               f"Nk {nk}->{_round_up(nk, PALLAS_BLOCK)} (padded keys masked)")
      return "pallas_tpu", f"Pallas TPU flash attention{pad}"
    if requested == "pallas_tpu":
      raise ValueError(f"attention implementation 'pallas_tpu' cannot run these inputs: {why_not}")
    return "xla", f"Pallas TPU flash attention unsupported: {why_not}"
  if backend == "cpu":
    return "einsum", ("CPU: einsums in the [B, H, N, hd] layout with a hand-written backward "
                      "(faster than jax.nn.dot_product_attention's XLA path on XLA:CPU)")
  return "xla", f"backend {backend!r} has no fused attention kernel here"


def _cudnn_unsupported(q_shape, k_shape, dtype, compute_capability, cuda) -> str | None:
  """None if cuDNN flash attention takes these inputs, else the reason it does not."""
  if not cuda:
    return "not a CUDA GPU (cuDNN is CUDA only)"
  if compute_capability is not None and tuple(compute_capability) < (8, 0):
    return f"compute capability {compute_capability} < 8.0 (flash attention needs sm80+)"
  err = _shape_error(q_shape, k_shape)
  if err:
    return err
  dt = np.dtype(dtype)
  if dt not in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
    return f"dtype {dt.name}: cuDNN flash attention needs bfloat16 or float16 (config.dtype)"
  hd = q_shape[-1]
  hopper = compute_capability is not None and tuple(compute_capability) >= (9, 0)
  h_max = 256 if hopper else 128
  if hd % 8 or hd > h_max:
    return f"head_dim {hd} must be a multiple of 8 and <= {h_max} on this GPU"
  return None


def _pallas_unsupported(q_shape, k_shape, dtype, num_devices, mesh_axes) -> str | None:
  err = _shape_error(q_shape, k_shape)
  if err:
    return err
  dt = np.dtype(dtype)
  if dt not in (np.dtype(jnp.float32), np.dtype(jnp.bfloat16)):
    return f"dtype {dt.name}: the kernel is used for float32 / bfloat16 only"
  b, nq, _, hd = q_shape
  nk = k_shape[1]
  if hd > PALLAS_BLOCK and hd % PALLAS_BLOCK:
    return f"head_dim {hd} must be <= {PALLAS_BLOCK} or a multiple of {PALLAS_BLOCK}"
  work = _round_up(nq, PALLAS_BLOCK) * _round_up(nk, PALLAS_BLOCK)
  if work > PALLAS_MAX_PAD_FACTOR * nq * nk:
    return (f"sequence lengths Nq {nq}, Nk {nk}: padding to multiples of {PALLAS_BLOCK} "
            f"would cost {work / (nq * nk):.1f}x the attention work")
  if num_devices > 1:
    if not mesh_axes:
      return (f"{num_devices} devices and no mesh in context: a Mosaic kernel needs shard_map "
              "(run the step under jax.set_mesh(mesh))")
    size = math.prod(mesh_axes.values())
    if b % size:
      return f"batch {b} not divisible by the {size} devices of the mesh {mesh_axes}"
  return None


def _shape_error(q_shape, k_shape) -> str | None:
  if len(q_shape) != 4 or len(k_shape) != 4:
    return f"expected 4-d q/k [B, N, H, hd], got {tuple(q_shape)} and {tuple(k_shape)}"
  if q_shape[0] != k_shape[0] or q_shape[2:] != k_shape[2:]:
    return (f"q {tuple(q_shape)} and k {tuple(k_shape)} must share batch, heads and "
            "head_dim")
  return None


def _device_info() -> dict[str, Any]:
  """The hardware facts choose_implementation needs, for the default backend."""
  info: dict[str, Any] = dict(num_devices=jax.device_count())
  mesh = jax.sharding.get_abstract_mesh()
  info["mesh_axes"] = dict(mesh.shape) if mesh.axis_names else None
  if jax.default_backend() == "gpu":
    d = jax.devices()[0]
    try:
      info["compute_capability"] = tuple(int(x) for x in d.compute_capability.split("."))
    except (AttributeError, ValueError):
      info["compute_capability"] = None
    info["cuda"] = "rocm" not in str(getattr(d.client, "platform_version", "")).lower()
  return info


def _log_once(key, impl: str, reason: str, backend: str) -> None:
  with _logged_lock:
    if key in _logged:
      return
    _logged.add(key)
  level = logging.WARNING if impl == "xla" and backend in ("gpu", "tpu") else logging.INFO
  logging.log(level, "attention q%s k%s %s: using %r (%s)", key[1], key[2], key[3], impl,
              reason)


def dot_product_attention(q: Array, k: Array, v: Array, implementation: str | None = None, *,
                          interpret: bool = False) -> Array:
  """softmax(q k^T / sqrt(hd)) v per head, on the backend's fastest kernel.

  Args:
    q: [B, Nq, H, hd]; k, v: [B, Nk, H, hd] (jax.nn.dot_product_attention's layout).
    implementation: None / 'auto', 'xla', 'cudnn', 'pallas_tpu' or 'einsum' (see
      choose_implementation).
    interpret: run the Pallas TPU kernel in TPU interpret mode (CPU tests only); with
      implementation='pallas_tpu' it skips the backend check. The kernel's backward is
      traced when jax.grad transposes, outside this call: to differentiate, also hold
      `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` around the grad.

  Returns:
    [B, Nq, H, hd], q's dtype.
  """
  if v.shape != k.shape:
    raise ValueError(f"v {v.shape} must have k's shape {k.shape}")
  backend, info = jax.default_backend(), _device_info()
  if interpret:
    if implementation != "pallas_tpu":
      raise ValueError("interpret=True is only for implementation='pallas_tpu'.")
    impl, reason = "pallas_tpu", "forced, TPU interpret mode"
    err = _shape_error(q.shape, k.shape)
    if err:
      raise ValueError(err)
  else:
    impl, reason = choose_implementation(backend, q.shape, k.shape, q.dtype, implementation,
                                         **info)
  _log_once((backend, tuple(q.shape), tuple(k.shape), np.dtype(q.dtype).name, implementation,
             interpret), impl, reason, backend)
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  if impl == "pallas_tpu":
    return _pallas_attention(q, k, v, info.get("mesh_axes"), interpret)
  if impl == "einsum":
    return einsum_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


# ----------------------------------------------------------------------------- 'einsum'
# softmax(q k^T / sqrt(hd)) v as two einsums in the [B, H, N, hd] layout, with the output
# normalised after the value matmul (a [Nq, hd] divide instead of an [Nq, Nk] one) and a
# flash-attention-style backward (dS = A * (dP - rowsum(dO * O))) on the saved A: on XLA:CPU
# 1.3-1.7x faster than jax.nn.dot_product_attention's XLA path, whose autodiff builds the
# softmax backward from broadcasts of the full [Nq, Nk] matrix (docs/platform_notes.md,
# "Attention on XLA:CPU"). Scores and softmax in float32 at least (as jax.nn's).


def einsum_attention(q: Array, k: Array, v: Array) -> Array:
  """softmax(q k^T / sqrt(hd)) v for q [B, Nq, H, hd], k / v [B, Nk, H, hd]; q's dtype."""
  t = lambda x: jnp.swapaxes(x, 1, 2)
  return t(_einsum_attention_bh(t(q), t(k), t(v)))


def _softmax_parts(q, k, v):
  acc = jnp.promote_types(q.dtype, jnp.float32)
  s = jnp.einsum("bhic,bhjc->bhij", q, k, preferred_element_type=acc) * (q.shape[-1] ** -0.5)
  p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bhij,bhjc->bhic", p.astype(v.dtype), v, preferred_element_type=acc) / l
  return o, p / l


@jax.custom_vjp
def _einsum_attention_bh(q, k, v):
  return _softmax_parts(q, k, v)[0].astype(q.dtype)


def _einsum_attention_fwd(q, k, v):
  o, a = _softmax_parts(q, k, v)
  return o.astype(q.dtype), (q, k, v, o, a)


def _einsum_attention_bwd(res, do):
  q, k, v, o, a = res
  acc = a.dtype
  do = do.astype(acc)
  dv = jnp.einsum("bhij,bhic->bhjc", a, do, preferred_element_type=acc)
  dp = jnp.einsum("bhic,bhjc->bhij", do, v, preferred_element_type=acc)
  ds = a * (dp - jnp.sum(do * o, axis=-1, keepdims=True)) * (q.shape[-1] ** -0.5)
  dq = jnp.einsum("bhij,bhjc->bhic", ds, k, preferred_element_type=acc)
  dk = jnp.einsum("bhij,bhic->bhjc", ds, q, preferred_element_type=acc)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_einsum_attention_bh.defvjp(_einsum_attention_fwd, _einsum_attention_bwd)


def _pallas_attention(q: Array, k: Array, v: Array, mesh_axes: dict[str, int] | None,
                      interpret: bool) -> Array:
  fn = functools.partial(_pallas_local, interpret=interpret)
  if mesh_axes and jax.device_count() > 1:
    # GSPMD cannot partition a Mosaic call: run it per batch shard.
    spec = jax.sharding.PartitionSpec(tuple(mesh_axes))
    fn = jax.shard_map(fn, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
  return fn(q, k, v)


def _pallas_local(q: Array, k: Array, v: Array, interpret: bool) -> Array:
  from jax.experimental.pallas.ops.tpu import flash_attention as fa

  b, nq, _, hd = q.shape
  nk = k.shape[1]
  nq_pad, nk_pad = _round_up(nq, PALLAS_BLOCK), _round_up(nk, PALLAS_BLOCK)
  # [B, N, H, hd] -> the kernel's [B, H, N, hd], sequences zero-padded.
  to_bhnd = lambda x, n: jnp.pad(x.swapaxes(1, 2), ((0, 0), (0, 0), (0, n - x.shape[1]),
                                                    (0, 0)))
  qt, kt, vt = to_bhnd(q, nq_pad), to_bhnd(k, nk_pad), to_bhnd(v, nk_pad)
  segment_ids = None
  if nk_pad != nk:
    # Padded keys get segment 0, every query (padded ones too) segment 1: padded keys are
    # masked and no query row is fully masked (padded rows are sliced off below).
    seg_q = jnp.ones((b, nq_pad), jnp.int32)
    seg_kv = jnp.broadcast_to((jnp.arange(nk_pad) < nk).astype(jnp.int32), (b, nk_pad))
    segment_ids = fa.SegmentIds(q=seg_q, kv=seg_kv)
  blk = PALLAS_BLOCK
  block_sizes = fa.BlockSizes(
      block_q=blk, block_k_major=blk, block_k=blk, block_b=1,
      block_q_major_dkv=blk, block_k_major_dkv=blk, block_k_dkv=blk, block_q_dkv=blk,
      block_k_major_dq=blk, block_k_dq=blk, block_q_dq=blk)
  # sm_scale multiplies the fp32 logits: the same 1/sqrt(hd) as jax.nn.dot_product_attention.
  call = functools.partial(fa.flash_attention, segment_ids=segment_ids, causal=False,
                           sm_scale=float(1.0 / np.sqrt(hd)), block_sizes=block_sizes)
  if interpret:
    from jax.experimental.pallas import tpu as pltpu
    with pltpu.force_tpu_interpret_mode():
      out = call(qt, kt, vt)
  else:
    out = call(qt, kt, vt)
  return out[:, :, :nq].swapaxes(1, 2).astype(q.dtype)
