"""Export a training run for inference:

  python -m structvit_jax.export --workdir=WORKDIR --out=EXPORT [--step=N] [--no_ema]

Reads WORKDIR/checkpoints/<step>/state (the newest step unless --step) and WORKDIR/config.json
(written by `python -m structvit_jax.main` at the start of training) and writes the params
(the EMA weights when the run kept them, unless --no_ema) and batch statistics, the model
config, the eval preprocessing and the class names (structvit_jax/inference.py).
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

from structvit_jax import inference


class ExportError(RuntimeError):
  """A workdir that cannot be exported; the message says why and what to run."""


def checkpoint_steps(workdir: str) -> list[int]:
  ckdir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckdir):
    return []
  # Orbax writes into '<step>.orbax-checkpoint-tmp-*' and renames when committed, so a
  # plain number is a finished checkpoint.
  return sorted(int(p) for p in os.listdir(ckdir)
                if p.isdigit() and os.path.isdir(os.path.join(ckdir, p, "state")))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ExportError(
        f"{path} not found: the model config is written there when training starts "
        f"(python -m structvit_jax.main --config=... --workdir={workdir}); runs from before "
        f"it was written: start that command again with the same config (it resumes from "
        f"the newest checkpoint and writes config.json).")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def input_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The eval preprocessing of config's dataset (data/pipeline.py, images.py, video.py)."""
  from structvit_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD, VIDEO_MEAN, VIDEO_STD
  data = config.data
  synthetic = data.name.startswith("synthetic_")
  frames = int(data.get("num_frames", 0) or 0)
  spec: dict[str, Any] = dict(image_size=int(data.image_size), num_frames=frames)
  if frames > 0:
    # synthetic_video clips are exactly num_frames frames at image_size: dense sampling at
    # rate 1 and a full-size centre crop leave them as the trainer's eval saw them.
    spec.update(kind="video", mean=list(data.get("mean", VIDEO_MEAN)),
                std=list(data.get("std", VIDEO_STD)),
                sampling="dense" if synthetic else data.get("sampling", "dense"),
                sampling_rate=1 if synthetic else int(data.get("sampling_rate", 1) or 1))
  else:
    # Synthetic images are rendered at image_size and only normalised in eval: crop ratio 1
    # keeps predict() on such images identical to the trainer's eval.
    spec.update(kind="image", mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                crop_ratio=1.0 if synthetic else float(data.get("eval_crop_ratio", 0.875)))
  return spec


def class_names(config: ml_collections.ConfigDict) -> list[str] | None:
  """From the dataset when it can say (synthetic sources, tfds label names), else None."""
  data = config.data
  if data.name == "synthetic_motion":
    from structvit_jax.data import motion
    return list(motion.DIRECTIONS)
  if data.name.startswith("synthetic_"):
    from structvit_jax.data import synthetic
    return list(synthetic.IMAGE_CLASSES if data.name == "synthetic_image" else synthetic.MOTIONS)
  if data.name in ("imagenet2012", "image_folder") and data.get("data_dir"):
    try:  # the data may not be on the exporting machine: names are optional
      import tensorflow_datasets as tfds
      from structvit_jax.data import builders
      prepared = builders.find_prepared(data.data_dir, data.get("tfds_name", "") or data.name)
      if prepared is not None:
        return list(tfds.builder_from_directory(prepared).info.features["label"].names)
    except Exception:  # noqa: BLE001
      return None
  return None


def _head_classes(params: Any) -> int:
  head = params.get("head") if isinstance(params, dict) else None
  if not head or "kernel" not in head:
    raise ExportError("cannot find the classifier ('head/kernel') in the checkpoint params")
  return int(np.shape(head["kernel"])[-1])


def export(workdir: str, out: str, step: int | None = None, use_ema: bool = True) -> str:
  """Writes the export of `workdir` to `out`; returns a one-line summary."""
  from structvit_jax import train
  config = read_config(workdir)
  steps = checkpoint_steps(workdir)
  if not steps:
    raise ExportError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')} "
                      f"(has the run saved one yet?)")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ExportError(f"no checkpoint of step {step} in {workdir}; steps: {steps}")
  state = inference.restore_arrays(os.path.join(os.path.abspath(workdir), "checkpoints",
                                          str(step), "state"))
  ema = use_ema and config.get("ema_decay", 0.0) > 0 and bool(state.get("ema_params"))
  params = state["ema_params"] if ema else state["params"]
  num_classes = _head_classes(params)
  names = class_names(config)
  if names is not None and len(names) != num_classes:
    names = None  # e.g. a dataset with config.data.num_classes overriding its label list
  kwargs = train.model_kwargs(config, num_classes)
  inference.save_export(out, config.model.name, kwargs,
                        {"params": params, "batch_stats": state.get("batch_stats") or {}},
                        input_spec(config), names,
                        source=f"{os.path.abspath(workdir)}@{step}" + (" (EMA)" if ema else ""))
  return (f"exported {config.model.name} step {step} ({'EMA' if ema else 'raw'} params, "
          f"{num_classes} classes) from {workdir} to {out}")


FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Defined only when run as a program: main.py defines --workdir too, and both modules
  # may be imported into one process (tests, notebooks).
  flags.DEFINE_string("workdir", None, "Training workdir (with checkpoints/ and config.json).")
  flags.DEFINE_string("out", None, "Export directory to write.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_bool("no_ema", False, "Export the raw params even when the run kept an EMA.")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every read at INFO
  try:
    print(export(FLAGS.workdir, FLAGS.out, FLAGS.step, use_ema=not FLAGS.no_ema))
  except ExportError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  _define_flags()
  app.run(main)
