"""What checkpoint checksums cost: save and restore of a config's full train state (params,
optimiser moments, EMA, step, RNG; random values) through checkpoint.Checkpointer, with
checksums (the default) and without, and the fingerprint alone. Prints a Markdown table.

  python benchmarks/checkpoint_checksums.py --config=configs/in1k_s.py --num_classes=1000

Save: `Checkpointer.save` (the trainer's blocking part: the fingerprints, and Orbax's copy
of the arrays to host) and until the async write is committed (`wait`). Restore:
`Checkpointer.restore` with the fallback's checks (verifying the arrays when on). The first
save and restore of each Checkpointer are left out (warm-up); the table has the median of
the others.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shutil
import statistics
import tempfile
import time


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--num_classes", type=int, required=True)
  ap.add_argument("--repeats", type=int, default=4)
  ap.add_argument("--dir", default="", help="where to write (default: a temporary directory)")
  a = ap.parse_args(argv)
  import jax
  import numpy as np
  from structvit_jax import checkpoint as ckpt_lib
  from structvit_jax import checksums
  from structvit_jax import optim, train_state
  spec = importlib.util.spec_from_file_location("config", a.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(None)
  size = config.data.image_size
  frames = config.data.get("num_frames", 0)
  shape = ((frames,) if frames else ()) + (size, size, 3)
  model = train_state.build_model(config, a.num_classes)
  tx = optim.make_optimizer(config, optim.make_schedule(config, 100, 10))
  init = functools.partial(train_state.init_state, model=model, tx=tx, input_shape=shape,
                           ema=config.ema_decay > 0)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def fill(x):
    if np.issubdtype(x.dtype, np.floating):
      return jax.device_put(rng.standard_normal(x.shape).astype(x.dtype), device)
    return jax.device_put(rng.randint(0, 2**31 - 1, x.shape).astype(x.dtype), device)
  state = jax.tree.map(fill, abstract)
  jax.block_until_ready(state)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract)
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  root = a.dir or tempfile.mkdtemp(prefix="ckpt_bench_")

  fp = []
  for _ in range(a.repeats):
    t0 = time.perf_counter()
    checksums.fingerprints(state)
    fp.append(time.perf_counter() - t0)

  times = {}
  for on in (False, True, False, True):  # interleaved: the disk cache warms both alike
    directory = os.path.join(root, "on" if on else "off")
    shutil.rmtree(directory, ignore_errors=True)
    ckpt = ckpt_lib.Checkpointer(directory, keep=a.repeats + 1, checksums=on)
    for step in range(1, a.repeats + 1):
      t0 = time.perf_counter()
      ckpt.save(step, state)
      t1 = time.perf_counter()
      ckpt.wait()
      t2 = time.perf_counter()
      t3 = time.perf_counter()
      restored, _ = ckpt.restore(target, step=step, check=lambda s, m: None)
      jax.block_until_ready(restored)
      t4 = time.perf_counter()
      del restored
      times.setdefault(on, []).append((t1 - t0, t2 - t0, t4 - t3))
    ckpt.close()
    shutil.rmtree(directory, ignore_errors=True)
  if not a.dir:
    shutil.rmtree(root, ignore_errors=True)

  def med(on, i):  # the first save/restore of a Checkpointer is its warm-up
    return statistics.median(t[i] for k, t in enumerate(times[on]) if k % a.repeats)

  print(f"{os.path.basename(a.config)}: {len(jax.tree.leaves(abstract))} arrays, "
        f"{nbytes / 2**20:.0f} MiB, on {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}); median of {2 * (a.repeats - 1)} saves/restores each")
  print()
  print("| seconds | without checksums | with checksums | overhead |")
  print("|---|---|---|---|")
  for name, i in (("save, blocking part", 0), ("save, until committed", 1),
                  ("restore (with the checks)", 2)):
    off, on = med(False, i), med(True, i)
    print(f"| {name} | {off:.2f} | {on:.2f} | {on - off:+.2f} ({(on / off - 1) * 100:+.0f}%) |")
  print(f"| fingerprints of the whole state alone | | {statistics.median(fp):.2f} | |")


if __name__ == "__main__":
  main()
