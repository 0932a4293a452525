"""Where the trainer's init goes: tracing, lowering, XLA compile and run of `init_state`
(train_state.py) for a config's model, at the training input size or another, with XLA's default
options or the trainer's (train_state.init_compiler_options). No persistent cache.

  python benchmarks/init_cost.py --config=configs/in1k_s.py --num_classes=1000
  python benchmarks/init_cost.py --config=configs/in1k_s.py --num_classes=1000 --size=32
  python benchmarks/init_cost.py --config=configs/demo.py --num_classes=10 --options=trainer
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import time


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--num_classes", type=int, required=True)
  ap.add_argument("--size", type=int, default=0, help="spatial size (default: the config's)")
  ap.add_argument("--options", choices=("default", "trainer"), default="default")
  a = ap.parse_args(argv)
  import jax
  from structvit_jax import optim, train_state
  spec = importlib.util.spec_from_file_location("config", a.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(None)
  jax.config.update("jax_enable_compilation_cache", False)
  size = a.size or config.data.image_size
  frames = config.data.get("num_frames", 0)
  shape = ((frames,) if frames else ()) + (size, size, 3)
  model = train_state.build_model(config, a.num_classes)
  tx = optim.make_optimizer(config, optim.make_schedule(config, 100, 10))
  init = functools.partial(train_state.init_state, model=model, tx=tx, input_shape=shape,
                           ema=config.ema_decay > 0)
  rng = jax.random.PRNGKey(config.seed)
  options = train_state.init_compiler_options() if a.options == "trainer" else {}
  t0 = time.perf_counter()
  jax.eval_shape(init, rng)  # the trace (train_state.make_init's abstract state); the lowering reuses it
  t1 = time.perf_counter()
  lowered = jax.jit(init).lower(rng)
  t2 = time.perf_counter()
  compiled = lowered.compile(options)
  t3 = time.perf_counter()
  jax.block_until_ready(compiled(rng))
  t4 = time.perf_counter()
  print(f"{a.config} {model.__class__.__name__} input {shape} options {options or 'default'}: "
        f"trace {t1 - t0:.1f} s, lower {t2 - t1:.1f} s, compile {t3 - t2:.1f} s, "
        f"run {t4 - t3:.1f} s; {time.process_time():.1f} s CPU in all")


if __name__ == "__main__":
  main()
