"""Compiled memory of one StructSA layer, fused vs reference (XLA memory_analysis).

  python benchmarks/structsa_memory.py                 # 8x14x14 tokens, 320 ch, 5 heads, D=4
  python benchmarks/structsa_memory.py --grid=14,14 --batch=8 --train
  python benchmarks/structsa_memory.py --grid=4,14,14 --train --time   # also run and time it

Only compiles (nothing runs) unless --time, so the literal path's N x N x C tensors need no
real memory; --time also runs each implementation (median of --repeats after a warm-up).
On CPU and without cuDNN, jax.nn.dot_product_attention materialises the N x N*D scores, so
the fused path's temporaries are the scores; flash attention (GPU/TPU) removes those too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from structvit_jax.models.structsa import StructSA, StructSAConfig


def layer_memory(grid, channels, heads, d, stride, batch, impl, train, repeats=0) -> dict:
  m = StructSA(num_heads=heads, structsa=StructSAConfig(d=d, stride=stride, form=impl))
  x = jax.ShapeDtypeStruct((batch, *grid, channels), jnp.float32)
  params = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))
  fn = (lambda p, x: jax.grad(lambda p: jnp.sum(m.apply(p, x)))(p)) if train else m.apply
  exe = jax.jit(fn).lower(params, x).compile()
  mem = exe.memory_analysis()
  out = dict(temp=mem.temp_size_in_bytes, args=mem.argument_size_in_bytes,
             out=mem.output_size_in_bytes, ms=None)
  if repeats:
    xs = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    p = m.init(jax.random.PRNGKey(0), xs)
    jax.block_until_ready(exe(p, xs))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(exe(p, xs))
      times.append(time.perf_counter() - t0)
    out["ms"] = 1e3 * statistics.median(times)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--grid", default="8,14,14")
  ap.add_argument("--channels", type=int, default=320)
  ap.add_argument("--heads", type=int, default=5)
  ap.add_argument("--d", type=int, default=4)
  ap.add_argument("--stride", type=int, default=1)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--train", action="store_true", help="forward + backward")
  ap.add_argument("--time", action="store_true", help="also run it and report the time")
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args()
  grid = tuple(int(g) for g in a.grid.split(","))
  n = 1
  for g in grid:
    n *= g
  scores = a.batch * a.heads * n * n * a.d * 4 // a.stride ** 2
  print(f"device {jax.devices()[0].device_kind}; grid {grid} (N={n}), C={a.channels}, "
        f"heads={a.heads}, D={a.d}, stride={a.stride}, batch={a.batch}, "
        f"{'fwd+bwd' if a.train else 'fwd'}; N x N*D fp32 scores = {scores / 2**20:.0f} MiB")
  print("| implementation | temp MiB | args MiB | out MiB | temp / scores | ms |")
  print("|---|---|---|---|---|---|")
  for impl in ("fused", "reference"):
    r = layer_memory(grid, a.channels, a.heads, a.d, a.stride, a.batch, impl, a.train,
                     a.repeats if a.time else 0)
    ms = "n/a" if r["ms"] is None else f"{r['ms']:.1f}"
    print(f"| {impl} | {r['temp'] / 2**20:.1f} | {r['args'] / 2**20:.1f} | "
          f"{r['out'] / 2**20:.1f} | {r['temp'] / scores:.2f} | {ms} |", flush=True)


if __name__ == "__main__":
  main()
