"""StructSA's train-step time against its FLOPs: SA vs StructSA, attention kernel before / after.

  python benchmarks/structsa_cpu.py                       # (a) tiny video DeiT, (b) 8x224 clips
  python benchmarks/structsa_cpu.py --cases=tiny --reps=9
  python benchmarks/structsa_cpu.py --cases=s224 --reps=3 --steps=1

Cases (each model in float32, a plain train step: jax.value_and_grad of the cross-entropy +
optax.adamw, jitted, state donated):
  tiny: the laptop Table 1 backbone (benchmarks/table1.py, DEIT): deit_tiny on 8x32x32 clips,
        frame-wise 8x8 patches -> an 8x4x4 token grid + a class token, width 64, 2 heads,
        2 blocks, batch 16, 8 classes; SA (D = 0) vs StructSA D = 4 (3x3x3, context).
  s224: uniformer_s (SA) vs structvit_s_4_1 on 8x224x224 clips, batch --s224_batch, 400 classes.
Attention kernels (StructSAConfig.attention_impl): 'xla' = jax.nn.dot_product_attention's XLA
path (the CPU default before the 'einsum' kernel), 'auto' = the backend's default (on CPU
'einsum', models/attention.py).

Timing: every step compiled first; then --reps rounds, each running every variant's
--steps steps in turn (interleaved, so a slow moment of a shared machine hits all of them);
per variant the median over rounds of wall and of process CPU time (user + system, all
threads) per step. FLOPs: XLA's cost_analysis() of the compiled train step. The ratios are
the StructSA model's over the SA model's with the same attention kernel.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from structvit_jax.models import get_model  # noqa: E402

# The deit backbone of benchmarks/table1.py (DEIT there).
TINY = dict(patch_size=8, temporal_patch_size=1, embed_dim=64, depth=2, num_heads=2,
            mlp_ratio=4.0, drop_path_rate=0.0)


def cases(a) -> dict[str, list[tuple[str, str, dict, tuple[int, ...], int]]]:
  """case -> [(row label, preset, overrides, input shape, classes)], SA first."""
  out = {}
  if "tiny" in a.cases:
    out["tiny"] = [("SA (D=0)", "deit_tiny", dict(TINY, structsa=dict(d=0)), (16, 8, 32, 32, 3), 8),
                   ("StructSA D=4", "deit_tiny", dict(TINY, structsa=dict(d=4)),
                    (16, 8, 32, 32, 3), 8)]
  if "s224" in a.cases:
    shape = (a.s224_batch, 8, 224, 224, 3)
    out["s224"] = [("UniFormer-S", "uniformer_s", dict(drop_path_rate=0.0), shape, 400),
                   ("StructViT-S-4-1", "structvit_s_4_1", dict(drop_path_rate=0.0), shape, 400)]
  return out


def build(preset: str, overrides: dict, shape, classes: int, attention_impl: str):
  kw = {k: v for k, v in overrides.items() if k != "structsa"}
  structsa = dict(overrides.get("structsa", {}), attention_impl=attention_impl)
  model = get_model(preset, num_classes=classes, structsa=structsa, **kw)
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(*shape), jnp.float32)
  y = jnp.asarray(np.arange(shape[0]) % classes)
  from structvit_jax import train_state
  init = jax.jit(lambda k: model.init(k, x[:1]))
  variables = init.lower(jax.random.PRNGKey(0)).compile(
      train_state.init_compiler_options())(jax.random.PRNGKey(0))
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}  # UniFormer: batch_stats
  tx = optax.adamw(1e-3, weight_decay=0.05)

  def loss(p, extra, x, y):
    logits, new = model.apply({"params": p, **extra}, x, train=True, mutable=list(extra),
                              rngs={"dropout": jax.random.PRNGKey(1)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(p, o, extra, x, y):
    (value, extra), grads = jax.value_and_grad(loss, has_aux=True)(p, extra, x, y)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, extra, value

  opt = tx.init(params)
  t0 = time.perf_counter()
  exe = step.lower(params, opt, extra, x, y).compile()
  compile_s = time.perf_counter() - t0
  cost = exe.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state = [params, opt, extra]

  def run():
    state[0], state[1], state[2], value = exe(*state, x, y)
    return value

  return run, float(cost.get("flops", float("nan"))), compile_s


def time_rounds(runs: dict, reps: int, steps: int, warmup: int) -> dict:
  for run in runs.values():
    for _ in range(warmup):
      jax.block_until_ready(run())
  wall = {k: [] for k in runs}
  cpu = {k: [] for k in runs}
  for _ in range(reps):
    for k, run in runs.items():
      t, c = time.perf_counter(), time.process_time()
      out = None
      for _ in range(steps):
        out = run()
      jax.block_until_ready(out)
      wall[k].append((time.perf_counter() - t) / steps * 1e3)
      cpu[k].append((time.process_time() - c) / steps * 1e3)
  return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in runs}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--cases", default="tiny,s224", help="comma-separated: tiny, s224")
  p.add_argument("--attention", default="xla,auto",
                 help="attention_impl values to compare (before, after), comma-separated")
  p.add_argument("--reps", type=int, default=5, help="interleaved rounds")
  p.add_argument("--steps", type=int, default=0, help="steps per round (0: 10 tiny, 1 s224)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--s224_batch", type=int, default=1)
  a = p.parse_args(argv)
  impls = [s.strip() for s in a.attention.split(",") if s.strip()]
  print(f"# {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}; {' '.join(sys.argv)}", flush=True)
  print("| case | model | attention_impl | GFLOP/step | step ms (wall) | step ms (CPU) | "
        "time / SA's (wall) | time / SA's (CPU) | FLOPs / SA's | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for case, rows in cases(a).items():
    runs, info = {}, {}
    for impl in impls:
      for label, preset, overrides, shape, classes in rows:
        run, flops, compile_s = build(preset, overrides, shape, classes, impl)
        runs[label, impl] = run
        info[label, impl] = (flops, compile_s)
    steps = a.steps or (10 if case == "tiny" else 1)
    times = time_rounds(runs, a.reps, steps, a.warmup)
    sa = rows[0][0]
    for impl in impls:
      for label, *_ in rows:
        flops, compile_s = info[label, impl]
        (w, c), (w0, c0) = times[label, impl], times[sa, impl]
        print(f"| {case} | {label} | {impl} | {flops / 1e9:.2f} | {w:.1f} | {c:.1f} | "
              f"{w / w0:.2f}x | {c / c0:.2f}x | {flops / info[sa, impl][0]:.2f}x | "
              f"{compile_s:.1f} |", flush=True)
  print(f"# medians over {a.reps} interleaved rounds; CPU = process user + system time per "
        "step (all threads); FLOPs: XLA cost_analysis of the compiled train step")
  return 0


if __name__ == "__main__":
  sys.exit(main())
