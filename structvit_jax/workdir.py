"""The layout of a run's workdir (a local path or gs://bucket/path): the one place that
names its files. Imports only paths.py, so the command-line error handling can use it."""

import os

from structvit_jax import paths


class Workdir:
  """The files of WORKDIR, as paths (local or gs://)."""

  def __init__(self, path: str):
    self.path = path
    self.config_json = os.path.join(path, "config.json")  # export.py rebuilds the model
    self.checkpoints = os.path.join(path, "checkpoints")  # <step>/{state,data_iter,...}
    self.eval_results = os.path.join(path, "eval_results.jsonl")
    self.tensorboard = os.path.join(path, "tensorboard")
    self.error_log = os.path.join(path, "error.log")      # tracebacks of bugs (cli.py)
    self.library_log = os.path.join(path, "library.log")  # library records (cli.py)

  def checkpoints_or_self(self) -> str:
    """WORKDIR/checkpoints when it exists, else the path itself (a checkpoint directory
    given directly, as init_from and `checkpoint --verify` accept)."""
    return self.checkpoints if paths.isdir(self.checkpoints) else self.path
