"""The layout of a run's workdir (a local path or gs://bucket/path): the one place that
names its files. Imports only paths.py, so the command-line error handling can use it."""

from __future__ import annotations

import dataclasses
import os

from structvit_jax import paths


@dataclasses.dataclass(frozen=True)
class Workdir:
  """WORKDIR/{config.json, checkpoints/, eval_results.jsonl, tensorboard/, error.log,
  library.log}."""
  path: str

  @property
  def config_json(self) -> str:
    """The run's config, written by the trainer; export.py rebuilds the model from it."""
    return os.path.join(self.path, "config.json")

  @property
  def checkpoints(self) -> str:
    return os.path.join(self.path, "checkpoints")

  @property
  def eval_results(self) -> str:
    return os.path.join(self.path, "eval_results.jsonl")

  @property
  def tensorboard(self) -> str:
    return os.path.join(self.path, "tensorboard")

  @property
  def error_log(self) -> str:
    return os.path.join(self.path, "error.log")

  @property
  def library_log(self) -> str:
    return os.path.join(self.path, "library.log")

  def checkpoints_or_self(self) -> str:
    """WORKDIR/checkpoints when it exists, else the path itself (a checkpoint directory
    given directly, as init_from and `checkpoint verify` accept)."""
    return self.checkpoints if paths.isdir(self.checkpoints) else self.path
