r"""Throughput of the input pipeline alone (no model): examples/s, total and per worker.

  python benchmarks/input_pipeline.py --config=configs/in1k_s.py \
      --config.data.data_dir=/data/tfds [--steps=50] [--batch_size=128] [--split=train]

Runs the training (or eval) input of the config as the trainer builds it for one process
(config.data.num_workers grain worker processes; 0 = in-process), skips --warmup batches
(worker start-up, first reads), then times --steps batches. "per worker" divides by the
number of worker processes (1 for in-process). The batches are the trainer's: uint8 images,
normalised later on the device (--host_normalize: float32, normalised in the pipeline, as
before that move); "bytes/example" is what one example carries to the devices, from the
dtypes and shapes printed with it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Sequence

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from structvit_jax.data import pipeline  # noqa: E402  (after the checkout is on the path)

FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Only when run as a program: the trainer (structvit_jax.main) defines --config too, and
  # both modules may be imported into one process (the tests).
  config_flags.DEFINE_config_file("config", None, "Training config file.")
  flags.DEFINE_integer("steps", 20, "Batches to time.")
  flags.DEFINE_integer("warmup", 3, "Batches to skip before timing.")
  flags.DEFINE_integer("batch_size", 0,
                       "Batch size of one process (0: the config's global one).")
  flags.DEFINE_enum("split", "train", ["train", "eval"], "Which input to time.")
  flags.DEFINE_bool("host_normalize", False, "float32 batches normalised in the pipeline "
                    "(the trainer's input is uint8, normalised on the device).")

def bench(config, split: str = "train", steps: int = 20, warmup: int = 3,
          batch_size: int = 0, host_normalize: bool = False) -> dict[str, Any]:
  bs = batch_size or (config.batch_size if split == "train"
                      else (config.eval_batch_size or config.batch_size))
  inp = pipeline.create_input(config, split, local_batch_size=bs, seed=config.seed,
                              uint8=not host_normalize)
  def eval_passes():  # eval passes are finite: chain them
    while True:
      it = inp.make_eval_iterator()
      yield from it
      if hasattr(it, "close"):
        it.close()
  it = inp.iterator if split == "train" else eval_passes()
  try:
    for _ in range(warmup):
      next(it)
    t0 = time.perf_counter()
    n = bad = 0
    for _ in range(steps):
      b = next(it)
      n += len(b["label"])
      bad += int(b["bad"].sum()) if "bad" in b else 0
    dt = time.perf_counter() - t0
    # What one example carries, from the dtypes and shapes of the last batch.
    fields = {k: (str(v.dtype), tuple(v.shape[1:])) for k, v in b.items()}
    bytes_per_example = sum(v[0].nbytes for v in b.values())
  finally:
    if hasattr(it, "close"):
      it.close()
  workers = int(config.data.num_workers)
  return dict(examples_per_sec=n / dt, per_worker=n / dt / max(1, workers), workers=workers,
              examples=n, seconds=dt, batch_size=bs, bad_examples=bad, fields=fields,
              bytes_per_example=bytes_per_example)


def main(argv: Sequence[str]) -> None:
  del argv
  c = FLAGS.config
  r = bench(c, FLAGS.split, FLAGS.steps, FLAGS.warmup, FLAGS.batch_size, FLAGS.host_normalize)
  print(f"{c.data.name} {FLAGS.split} {c.data.image_size}px, batch {r['batch_size']}, "
        f"{r['workers']} workers ({'in-process' if not r['workers'] else 'processes'}): "
        f"{r['examples_per_sec']:.1f} examples/s, {r['per_worker']:.1f} examples/s per worker "
        f"({r['examples']} examples in {r['seconds']:.2f} s, {r['bad_examples']} bad)")
  fields = ", ".join(f"{k} {d}{list(s)}" for k, (d, s) in r["fields"].items())
  print(f"per example: {fields}: {r['bytes_per_example']} bytes/example")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
