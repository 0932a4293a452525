"""Does a model learn synthetic_motion at all? A plain optax loop, no trainer, for quick pilots.

  python benchmarks/motion_probe.py --speed=8 --coherence=1 --lr=1e-3 --steps=600 --qkv_scale=4

Trains the video DeiT of benchmarks/table1.py (deit_tiny, frame-wise 8x8 patches, 64 wide,
2 blocks) on 4,000 synthetic_motion clips (8x32x32) with AdamW (warm-up 10%, cosine), batch
16, and prints the mean train loss five times and the top-1 on 400 held-out clips. It is how
the Table 1 settings were piloted with SA alone (README "Table 1 at laptop scale"):
--qkv_scale multiplies the drawn qkv kernels (4 = std 0.08 instead of timm's 0.02), --norm
picks the clips' normalisation (the dots' own statistics or the video datasets').
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NORMS = {"dots": (0.08, 0.27), "video": (0.45, 0.225)}


def main(argv=None) -> float:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--speed", type=float, default=8.0, help="pixels a frame")
  p.add_argument("--coherence", type=float, default=1.0)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--d", type=int, default=0, help="StructSA D (0: SA)")
  p.add_argument("--qkv_scale", type=float, default=1.0)
  p.add_argument("--norm", choices=NORMS, default="dots")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from structvit_jax.data.motion import SyntheticMotionSource
  from structvit_jax.models import get_model

  src = SyntheticMotionSource("train", 4000, 32, 8, coherence=a.coherence, speed=a.speed)
  ev = SyntheticMotionSource("validation", 400, 32, 8, coherence=a.coherence, speed=a.speed)
  mean, std = NORMS[a.norm]

  def batch(s, idx):
    items = [s[int(i)] for i in idx]
    x = (np.stack([it["image"] for it in items]).astype(np.float32) / 255. - mean) / std
    return jnp.asarray(x), jnp.asarray(np.array([it["label"] for it in items]))

  model = get_model("deit_tiny", patch_size=8, temporal_patch_size=1, embed_dim=64, depth=2,
                    num_heads=2, num_classes=8, drop_path_rate=0.0, structsa=dict(d=a.d))
  params = jax.jit(model.init)(jax.random.PRNGKey(a.seed), batch(src, range(16))[0])["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: v * a.qkv_scale if "qkv" in jax.tree_util.keystr(path)
      and "kernel" in jax.tree_util.keystr(path) else v, params)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, a.lr, a.steps // 10, a.steps, 1e-5),
                   weight_decay=0.05)
  opt = tx.init(params)

  @jax.jit
  def step(p, o, x, y):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x),
                                                             y).mean()
    l, g = jax.value_and_grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, l

  pred = jax.jit(lambda p, x: model.apply({"params": p}, x).argmax(-1))
  rng = np.random.default_rng(a.seed)
  start, losses, every = time.time(), [], max(1, a.steps // 5)
  for i in range(a.steps):
    params, opt, l = step(params, opt, *batch(src, rng.integers(0, 4000, 16)))
    losses.append(float(l))
    if (i + 1) % every == 0:
      print(f"step {i + 1}: train loss {np.mean(losses[-every:]):.4f} "
            f"({time.time() - start:.0f} s)", flush=True)
  top1 = float(np.mean([(np.asarray(pred(params, batch(ev, range(j, j + 50))[0]))
                         == np.asarray(batch(ev, range(j, j + 50))[1])).mean()
                        for j in range(0, 400, 50)]))
  print(f"eval top-1 {top1:.4f} (400 clips; chance 0.125)")
  return top1


if __name__ == "__main__":
  main()
