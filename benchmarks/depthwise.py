"""Depthwise convolution formulations: forward and forward+backward time per shape.

Times `structvit_jax.models.layers.depthwise_conv` with impl 'xla' (grouped
conv_general_dilated) against 'shift' (a fori_loop of shifted multiply-adds) on the shapes
the models use, on the default backend:

  python benchmarks/depthwise.py --batch 1 --dtype float32            # CPU
  python benchmarks/depthwise.py --batch 32 --dtype bfloat16          # GPU / TPU

fwd+bwd is the gradient of <y, g> w.r.t. both the input and the kernel (training needs
both). Each cell: median of up to --repeats runs after one warm-up call (compile time is
reported separately, as "first calls": compile + first run of fwd and of fwd+bwd); a cell
stops repeating once it has used --budget seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from structvit_jax.models.layers import depthwise_conv

# (name, input shape without batch, window, channel multiplier D, strides)
SHAPES = [
    ("UniFormer-S video s1 local 5x5x5", (8, 56, 56, 64), (5, 5, 5), 1, (1, 1, 1)),
    ("UniFormer-S video s1 pos 3x3x3", (8, 56, 56, 64), (3, 3, 3), 1, (1, 1, 1)),
    ("UniFormer-S video s2 local 5x5x5", (8, 28, 28, 128), (5, 5, 5), 1, (1, 1, 1)),
    ("UniFormer-S video s2 pos 3x3x3", (8, 28, 28, 128), (3, 3, 3), 1, (1, 1, 1)),
    ("StructSA k/v 3x3x3 D=4", (8, 14, 14, 320), (3, 3, 3), 4, (1, 1, 1)),
    ("StructSA k/v 3x3x3 D=4 stride 2", (8, 28, 28, 128), (3, 3, 3), 4, (1, 2, 2)),
    ("image s1 local 5x5", (56, 56, 64), (5, 5), 1, (1, 1)),
]


def _time(fn, args, repeats: int, budget: float) -> tuple[float, float]:
  """(compile + first run seconds, median seconds of the timed runs)."""
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < repeats and (not times or time.perf_counter() - start < budget):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


def bench(batch: int, dtype: str, impls: list[str], repeats: int, budget: float,
          only: str | None) -> list[dict]:
  rows = []
  for name, shape, window, d, strides in SHAPES:
    if only and only.lower() not in name.lower():
      continue
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (batch, *shape), dtype)
    kernel = jax.random.normal(kk, (*window, d, shape[-1]), jnp.float32) * 0.1
    out = [(n - 1) // s + 1 for n, s in zip(shape[:-1], strides)]
    g = jax.random.normal(kg, (batch, *out, d, shape[-1]), dtype)
    for impl in impls:
      fwd = jax.jit(lambda x, w, impl=impl, s=strides: depthwise_conv(x, w, s, impl=impl))
      loss = lambda x, w, g, impl=impl, s=strides: jnp.sum(
          depthwise_conv(x, w, s, impl=impl).astype(jnp.float32) * g.astype(jnp.float32))
      fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
      c_f, t_f = _time(fwd, (x, kernel), repeats, budget)
      c_b, t_b = _time(fwd_bwd, (x, kernel, g), repeats, budget)
      row = dict(name=name, shape=(batch, *shape), window=window, d=d, strides=strides,
                 impl=impl, fwd_ms=t_f * 1e3, fwd_bwd_ms=t_b * 1e3, compile_s=c_f + c_b)
      rows.append(row)
      print(f"  {name:34s} {impl:6s} fwd {row['fwd_ms']:9.1f} ms  fwd+bwd "
            f"{row['fwd_bwd_ms']:9.1f} ms  (first calls {row['compile_s']:.1f} s)", flush=True)
  return rows


def table(rows: list[dict], impls: list[str]) -> str:
  head = "| shape | window, D, strides | " + " | ".join(
      f"{i} fwd ms | {i} fwd+bwd ms | {i} fwd+bwd/fwd | {i} first calls s" for i in impls) + " |"
  if len(impls) == 2:
    head += f" fwd {impls[0]}/{impls[1]} | fwd+bwd {impls[0]}/{impls[1]} |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  names = list(dict.fromkeys(r["name"] for r in rows))
  for n in names:
    by = {r["impl"]: r for r in rows if r["name"] == n}
    r0 = next(iter(by.values()))
    cells = [f"{n} {list(r0['shape'])}", f"{'x'.join(map(str, r0['window']))}, D={r0['d']}, "
             f"{'x'.join(map(str, r0['strides']))}"]
    for i in impls:
      r = by.get(i)
      cells += ([f"{r['fwd_ms']:.1f}", f"{r['fwd_bwd_ms']:.1f}",
                 f"{r['fwd_bwd_ms'] / r['fwd_ms']:.1f}x", f"{r['compile_s']:.1f}"]
                if r else ["-"] * 4)
    if len(impls) == 2 and all(i in by for i in impls):
      a, b = by[impls[0]], by[impls[1]]
      cells += [f"{a['fwd_ms'] / b['fwd_ms']:.2f}x", f"{a['fwd_bwd_ms'] / b['fwd_bwd_ms']:.2f}x"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--impls", default="xla,shift", help="comma-separated: xla, shift, auto")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--budget", type=float, default=5.0,
                 help="seconds of timed runs per cell before it stops repeating")
  p.add_argument("--only", default=None, help="run the shapes whose name contains this")
  a = p.parse_args()
  impls = [i.strip() for i in a.impls.split(",") if i.strip()]
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax "
        f"{jax.__version__}, batch {a.batch}, {a.dtype}", flush=True)
  rows = bench(a.batch, jnp.dtype(a.dtype), impls, a.repeats, a.budget, a.only)
  print()
  print(table(rows, impls))


if __name__ == "__main__":
  main()
