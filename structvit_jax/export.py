"""Export a training run for inference:

  python -m structvit_jax.export --workdir=WORKDIR --out=EXPORT [--step=N] [--no_ema] [--onnx]

Reads WORKDIR/checkpoints/<step>/state (the newest step unless --step) and WORKDIR/config.json
(written by `python -m structvit_jax.main` at the start of training) and writes the params
(the EMA weights when the run kept them, unless --no_ema) and batch statistics, the model
config, the eval preprocessing and the class names (structvit_jax/inference.py), the eval
forward as model.stablehlo (unless --nostablehlo) and with --onnx as model.onnx
(structvit_jax/serving_export.py), and the model card README.md.
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

from structvit_jax import checkpoint as ckpt_lib
from structvit_jax import cli
from structvit_jax import inference
from structvit_jax import paths
from structvit_jax import train_state
from structvit_jax.workdir import Workdir


class ExportError(cli.UserError, RuntimeError):
  """A workdir that cannot be exported; the message says why and what to run."""


def _model_tree(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
  """{'params', 'batch_stats'} shapes of config's model (jax.eval_shape: nothing computed)."""
  import jax
  from structvit_jax.data.preprocessing import eval_spec
  model = train_state.build_model(config, num_classes)
  spec = eval_spec(config.data)
  size = spec["image_size"]
  shape = ((spec["num_frames"], size, size, 3) if spec["num_frames"] > 0
           else (size, size, 3))
  key = jax.random.PRNGKey(0)
  variables = jax.eval_shape(
      lambda x: model.init({"params": key, "dropout": key}, x, train=False),
      jax.ShapeDtypeStruct((1, *shape), np.float32))
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _read_checkpoint(workdir: str, config: ml_collections.ConfigDict, step: int,
                     steps: list[int]) -> tuple[dict[str, Any], int]:
  """(the arrays of checkpoint `step`, its number of classes), after checking they are
  complete and are the recorded model's; else ExportError naming the step, why, and the
  --step to try."""
  checkpoints = Workdir(paths.abspath(workdir)).checkpoints
  step_dir = os.path.join(checkpoints, str(step))
  older = [s for s in steps if s < step]
  hint = f"; export an older step with --step={older[-1]}" if older else ""
  bad = ckpt_lib.unusable_reason(step_dir, with_data_iter=False)
  if bad is not None:
    raise ExportError(f"checkpoint step {step} in {workdir} is unusable: {bad[1]}{hint}")
  try:
    metadata = ckpt_lib.state_metadata(os.path.join(step_dir, "state"))
    num_classes = int(metadata["params"]["head"]["kernel"].shape[-1])
  except KeyError:
    raise ExportError("cannot find the classifier ('head/kernel') in the checkpoint "
                      "params") from None
  except Exception as e:  # noqa: BLE001
    raise ExportError(f"checkpoint step {step} in {workdir} is unusable: its metadata does "
                      f"not read ({ckpt_lib.short_cause(e)}){hint}") from None
  diff = ckpt_lib.tree_difference(
      _model_tree(config, num_classes),
      {"params": metadata["params"], "batch_stats": metadata.get("batch_stats", {})},
      what=f"the recorded model {config.model.name} (config.json)",
      where=f"checkpoint step {step}")
  if diff:
    raise ExportError(f"checkpoint step {step} in {workdir} does not fit the recorded model "
                      f"{config.model.name} ({Workdir(workdir).config_json}): {diff}")
  try:
    return ckpt_lib.read_step_arrays(checkpoints, step), num_classes
  except ckpt_lib.CheckpointError as e:
    raise ExportError(f"checkpoint step {step} in {workdir} is unusable: {e}{hint}") from None


def provenance(workdir: str, config: ml_collections.ConfigDict, step: int, ema: bool
               ) -> dict[str, Any]:
  """What the model card says of the training run: dataset, planned steps, the exported
  step, and the last eval top-1 of eval_results.jsonl (the EMA's when EMA is exported)."""
  from structvit_jax import run_log
  steps = int(config.get("num_train_steps") or 0)
  out: dict[str, Any] = {"workdir": paths.abspath(workdir), "step": int(step), "ema": ema,
                         "dataset": config.data.name,
                         "planned": f"{steps} steps" if steps > 0 else
                                    f"{config.get('num_epochs'):g} epochs"}
  try:
    records = run_log.read_eval_records(workdir)
  except Exception:  # noqa: BLE001  (a card without the number beats no export)
    records = []
  keys = ("eval_ema/top1", "eval/top1") if ema else ("eval/top1",)
  for record in reversed(records):
    key = next((k for k in keys if k in record), None)
    if key is not None:
      out.update(eval_top1=float(record[key]), eval_step=record.get("step"), eval_key=key)
      break
  return out


def export(workdir: str, out: str, step: int | None = None, use_ema: bool = True,
           stablehlo: bool = True, onnx: bool = False) -> str:
  """Writes the export of `workdir` to `out`: Orbax params, model.json, model.stablehlo
  (unless stablehlo=False), model.onnx (onnx=True) and the model card README.md
  (serving_export.py); returns a one-line summary."""
  from structvit_jax.data import registry
  from structvit_jax.data.preprocessing import eval_spec, eval_views
  paths.forget_listings(workdir)  # gs://: what the trainer wrote since this process looked
  if paths.exists(out) and not paths.isdir(out):
    raise ExportError(f"--out={out} is a file; give a new directory (or an earlier export "
                      "to replace)")
  if not paths.isdir(workdir):
    raise ExportError(f"--workdir={workdir} is not a directory (the --workdir of a "
                      "training run)")
  path = Workdir(workdir).config_json
  if not paths.isfile(path):
    raise ExportError(
        f"{path} not found: the model config is written there when training starts "
        f"(python -m structvit_jax.main --config=... --workdir={workdir}); runs from before "
        f"it was written: start that command again with the same config (it resumes from "
        f"the newest checkpoint and writes config.json).")
  config = ml_collections.ConfigDict(json.loads(paths.read_text(path)))
  steps = ckpt_lib.list_steps(Workdir(workdir).checkpoints)  # the finished steps
  if not steps:
    raise ExportError(f"no checkpoint in {Workdir(workdir).checkpoints} "
                      f"(has the run saved one yet?)")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ExportError(f"no checkpoint of step {step} in {workdir}; steps: {steps}")
  state, num_classes = _read_checkpoint(workdir, config, step, steps)
  ema = use_ema and config.get("ema_decay", 0.0) > 0 and bool(state.get("ema_params"))
  params = state["ema_params"] if ema else state["params"]
  names = registry.class_names(config.data)
  if names is not None and len(names) != num_classes:
    names = None  # e.g. a dataset with config.data.num_classes overriding its label list
  kwargs = train_state.model_kwargs(config, num_classes)
  inference.save_export(out, config.model.name, kwargs,
                        {"params": params, "batch_stats": state.get("batch_stats") or {}},
                        {**eval_spec(config.data), **eval_views(config.data)}, names,
                        source=f"{paths.abspath(workdir)}@{step}" + (" (EMA)" if ema else ""),
                        stablehlo=stablehlo, onnx=onnx,
                        provenance=provenance(workdir, config, step, ema))
  formats = ", ".join(["Orbax params"] + ["StableHLO"] * stablehlo + ["ONNX"] * onnx)
  return (f"exported {config.model.name} step {step} ({'EMA' if ema else 'raw'} params, "
          f"{num_classes} classes) from {workdir} to {out} ({formats}, model card)")


FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Defined only when run as a program: main.py defines --workdir too, and both modules
  # may be imported into one process (tests, notebooks).
  flags.DEFINE_string("workdir", None, "Training workdir (with checkpoints/ and config.json).")
  flags.DEFINE_string("out", None, "Export directory to write.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_bool("no_ema", False, "Export the raw params even when the run kept an EMA.")
  flags.DEFINE_bool("stablehlo", True, "Write model.stablehlo (jax.export; --nostablehlo: "
                    "skip it).")
  flags.DEFINE_bool("onnx", False, "Also write model.onnx (jax2onnx, checked with "
                    "onnxruntime; pip install 'structvit_jax[onnx]').")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every read at INFO
  from structvit_jax import serving_export
  try:
    print(export(FLAGS.workdir, FLAGS.out, FLAGS.step, use_ema=not FLAGS.no_ema,
                 stablehlo=FLAGS.stablehlo, onnx=FLAGS.onnx))
  except serving_export.ServingExportError as e:
    raise ExportError(str(e)) from None


if __name__ == "__main__":
  _define_flags()
  cli.quiet_library_logs()
  cli.run(main)
