"""Every check of a config, each a one-line cli.UserError naming the field and the fix:
the command line's `--config=FILE[:arg]` and `--config.x=y` overrides (before absl parses
them), the values (`check_config`, before anything is built), the batch sizes against the
devices, and a resume's changes against the run's recorded config. Dataset details are
data/'s to check.
"""

from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import json
import os
import re
from typing import Any

from absl import logging
import jax
import ml_collections

from structvit_jax import checkpoint as ckpt_lib
from structvit_jax import paths
from structvit_jax.cli import UserError
from structvit_jax.workdir import Workdir


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path[:arg]` -> get_config(arg) of that file (as ml_collections' --config flag loads
  it), with one clear UserError for a missing file, a syntax error, a failing import, no
  get_config or a bad config string."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    hint = ("a directory, not a config file" if os.path.isdir(path) else "no such file")
    raise UserError(f"--config={spec}: {path}: {hint} (give a recipe file such as "
                    f"configs/demo.py; paths are relative to {os.getcwd()})")
  module_name = "_structvit_config_check_" + re.sub(r"\W", "_", os.path.abspath(path))
  try:
    loader = importlib.machinery.SourceFileLoader(module_name, path)
    spec_ = importlib.util.spec_from_loader(module_name, loader)
    module = importlib.util.module_from_spec(spec_)
    loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"--config={spec}: syntax error in {e.filename or path} line {e.lineno}: "
                    f"{e.msg}") from e
  except Exception as e:  # noqa: BLE001  (whatever the file raises while it is imported)
    raise UserError(f"--config={spec}: {path} failed to load: {type(e).__name__}: {e}") from e
  if not callable(getattr(module, "get_config", None)):
    raise UserError(f"--config={spec}: {path} has no get_config() (a config file defines "
                    "get_config(arg=None) returning an ml_collections.ConfigDict)")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except ValueError as e:  # parse_arg: unknown key or bad value in the config string
    raise UserError(f"--config={spec}: {e}") from e
  return config


def check_overrides(config: ml_collections.ConfigDict, fields: list[str],
                    flag: str = "config") -> None:
  """Raises a UserError naming the valid (and the nearest) fields for a `--config.x.y`
  override whose field does not exist in `config`."""
  for field in fields:
    node: Any = config
    parts = field.split(".")
    for i, part in enumerate(parts):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      if isinstance(node, ml_collections.ConfigDict):
        prefix = ".".join(parts[:i])
        valid = sorted(node.keys())
        near = difflib.get_close_matches(field, _flat(config.to_dict()), n=3, cutoff=0.6)
        raise UserError(
            f"--{flag}.{field}: unknown config field {part!r}"
            + (f" in {prefix}" if prefix else "")
            + (f"; did you mean {', '.join(near)}?" if near else "")
            + f" valid fields{' of ' + prefix if prefix else ''}: {', '.join(valid)}")
      raise UserError(f"--{flag}.{field}: {'.'.join(parts[:i])} is a value, not a group "
                      "of fields")


def check_config_argv(argv: list[str], flag: str = "config") -> None:
  """Loads `--config=FILE[:arg]` from argv and checks every `--config.field=...` override
  against it, before absl parses the flags (whose own errors are tracebacks)."""
  spec, fields = None, []
  for a in argv[1:]:
    if a == "--":
      break
    name = a.lstrip("-").split("=", 1)[0]
    if a.startswith("-") and name == flag and "=" in a:
      spec = a.split("=", 1)[1]
    elif a.startswith("-") and name.startswith(flag + "."):
      fields.append(name[len(flag) + 1:])
    elif a.startswith("-") and name.startswith("no" + flag + "."):  # --noconfig.flag
      fields.append(name[len(flag) + 3:])
  if spec is None:
    return  # absl names the missing required flag
  check_overrides(load_config_file(spec), fields, flag)


def _nearest(name: str, valid: list[str]) -> str:
  near = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
  return f"did you mean {', '.join(near)}? " if near else ""


def check_config(config: ml_collections.ConfigDict) -> None:
  """The mistakes that can be named before anything is built (cli.UserError)."""
  from structvit_jax import models
  from structvit_jax.data import registry
  valid = models.list_models()
  if config.model.name not in valid:
    raise UserError(
        f"--config.model.name={config.model.name}: unknown model; "
        f"{_nearest(config.model.name, valid)}valid names: {', '.join(valid)}")
  datasets = registry.names()
  if config.data.name not in datasets:
    raise UserError(
        f"--config.data.name={config.data.name}: unknown dataset; "
        f"{_nearest(config.data.name, datasets)}valid names: {', '.join(datasets)}")
  if config.batch_size <= 0:
    raise UserError(f"--config.batch_size={config.batch_size}: must be positive")
  if config.eval_batch_size < 0:
    raise UserError(f"--config.eval_batch_size={config.eval_batch_size}: must be "
                    ">= 0 (0: the training batch size)")
  if config.grad_accum_steps <= 0:
    raise UserError(f"--config.grad_accum_steps={config.grad_accum_steps}: must be "
                    "positive")
  if not config.distributed.enabled:  # multi-host: counted after jax.distributed starts
    check_batch_sizes(config, jax.device_count())
  if "://" in config.data.get("data_dir", ""):
    raise UserError(
        f"--config.data.data_dir={config.data.data_dir}: datasets are read from a local "
        "disk or a mount (NFS, gcsfuse), not from a URL; copy the prepared dataset there")
  _check_dataset(config, registry.get(config.data.name))


def _check_dataset(config: ml_collections.ConfigDict, dataset) -> None:
  """What config.data asks of its dataset's facts (data/registry.py)."""
  from structvit_jax.data import registry
  data = config.data
  if dataset.builtin and not config.eval_only and config.batch_size > data.train_examples:
    raise UserError(
        f"--config.batch_size={config.batch_size}: larger than the {data.train_examples} "
        f"training examples (config.data.train_examples); lower it or raise train_examples")
  if dataset.kind == "video" and not data.num_frames:
    raise UserError(f"--config.data.num_frames={data.num_frames}: {data.name!r} is a "
                    "video dataset; set its clip length (> 0)")
  if data.get("token_label_dir") and not dataset.token_labels:
    raise UserError(
        f"--config.data.token_label_dir: {data.name!r} has no token labels (image datasets "
        f"only: {', '.join(registry.names(lambda d: d.token_labels))})")


def check_batch_sizes(config: ml_collections.ConfigDict, ndev: int) -> None:
  """The global batches (and grad_accum_steps' microbatches) split evenly over ndev."""
  eval_bs = config.eval_batch_size or config.batch_size
  for name, bs in (("batch_size", config.batch_size), ("eval_batch_size", eval_bs)):
    if bs % ndev:
      raise UserError(
          f"--config.{name}={bs}: must be divisible by the {ndev} devices "
          f"(e.g. --config.{name}={max(ndev, bs // ndev * ndev)})")
  accum = config.grad_accum_steps
  if config.batch_size % accum or (config.batch_size // accum) % ndev:
    raise UserError(f"--config.batch_size={config.batch_size} / --config.grad_accum_steps="
                    f"{accum}: must be a multiple of the {ndev} devices")


# The config fields a resume may change (README, "Faults on resume"): evaluation, logging,
# checkpoint cadence, input workers and where data lives, sharding layout, multi-host
# wiring. Every other field (model, data, batch size, schedule, optimiser, seed, ...)
# gives the saved state (params, optimiser moments, step, data position) its meaning, so a
# resume that changes one is refused. A trailing '.' means every field under that group.
RESUME_MAY_CHANGE = (
    "eval_every_epochs", "eval_batch_size", "eval_only", "data.eval_split",
    "data.eval_examples", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "transfer_guard", "data.num_workers", "data.data_dir", "fsdp", "resume", "init_from.",
    "distributed.", "compilation_cache_dir",
)


# Fields added to the configs after runs were started without them, with the value such a
# run was trained with: resuming it keeps that value (a resume must not change the recipe).
RESUME_LEGACY_VALUES = {
    "weight_decay_mask": "no_pos_embed",
}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(recorded: dict, config: ml_collections.ConfigDict) -> list[str]:
  """'field: recorded -> requested' for every field a resume may not change. Fields only
  one side has (added to or removed from the configs since the run started) are not
  compared: the checkpoint's arrays are still checked against the model on restore."""
  now = _flat(json.loads(config.to_json_best_effort()))
  before = _flat(recorded)
  changes = []
  for k in sorted(set(now) & set(before)):
    if k in RESUME_MAY_CHANGE or any(p.endswith(".") and k.startswith(p)
                                    for p in RESUME_MAY_CHANGE):
      continue
    a, b = before[k], now[k]
    if a != b:
      changes.append(f"{k}: {a!r} -> {b!r}")
  return changes


def check_resume_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses (CheckpointMismatchError, one line) to resume workdir's checkpoints with a
  config that changes a field outside RESUME_MAY_CHANGE."""
  path = Workdir(workdir).config_json
  steps = ckpt_lib.list_steps(Workdir(workdir).checkpoints)
  if not steps or not paths.isfile(path):
    return
  recorded = json.loads(paths.read_text(path))
  for field, legacy in RESUME_LEGACY_VALUES.items():
    if field not in recorded and config.get(field, legacy) != legacy:
      logging.warning("%s: the run started before config field %s existed and trained with "
                      "%r; resuming with that value (not %r)", workdir, field, legacy,
                      config[field])
      config[field] = legacy
  changes = config_changes(recorded, config)
  if changes:
    model = recorded.get("model", {}).get("name")
    raise ckpt_lib.CheckpointMismatchError(
        f"{workdir} holds a run of {model} (checkpoints up to step {steps[-1]}) whose "
        f"config differs in fields a resume may not change: {'; '.join(changes)}. Use a new "
        f"--workdir, or the recorded values ({path}); a resume may change only "
        f"{', '.join(f + '*' if f.endswith('.') else f for f in RESUME_MAY_CHANGE)}.")
