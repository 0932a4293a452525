"""Entry point: python -m structvit_jax.main --config=configs/demo.py --workdir=DIR.

Variants through the config string (configs/in1k_s.py:d=8,stride=1), overrides with
--config.x=y. The multi-host flags override config.distributed for launchers.
A mistake in the flags or config is one `error:` line and exit status 2; a fault of the run
(non-finite loss, disk full) one line and status 1; --verbose shows tracebacks
(structvit_jax/errors.py). Compiled programs go to a persistent cache
(config.compilation_cache_dir, structvit_jax/compile_cache.py): a restart compiles nothing.
"""

import difflib
import os
import sys
import uuid

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from structvit_jax import compile_cache
from structvit_jax import config_utils
from structvit_jax import errors
from structvit_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard events.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def _nearest(name: str, valid: list[str]) -> str:
  near = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
  return f"did you mean {', '.join(near)}? " if near else ""


def check_config(config) -> None:
  """The mistakes that can be named before anything is built (errors.UserError)."""
  from structvit_jax import models
  from structvit_jax.data import registry
  valid = models.list_models()
  if config.model.name not in valid:
    raise errors.UserError(
        f"--config.model.name={config.model.name}: unknown model; "
        f"{_nearest(config.model.name, valid)}valid names: {', '.join(valid)}")
  datasets = registry.names()
  if config.data.name not in datasets:
    raise errors.UserError(
        f"--config.data.name={config.data.name}: unknown dataset; "
        f"{_nearest(config.data.name, datasets)}valid names: {', '.join(datasets)}")
  if config.batch_size <= 0:
    raise errors.UserError(f"--config.batch_size={config.batch_size}: must be positive")
  if config.eval_batch_size < 0:
    raise errors.UserError(f"--config.eval_batch_size={config.eval_batch_size}: must be "
                           ">= 0 (0: the training batch size)")
  if config.grad_accum_steps <= 0:
    raise errors.UserError(f"--config.grad_accum_steps={config.grad_accum_steps}: must be "
                           "positive")
  if not config.distributed.enabled:  # multi-host: counted after jax.distributed starts
    ndev = jax.device_count()
    eval_bs = config.eval_batch_size or config.batch_size
    for name, bs in (("batch_size", config.batch_size), ("eval_batch_size", eval_bs)):
      if bs % ndev:
        raise errors.UserError(
            f"--config.{name}={bs}: must be divisible by the {ndev} devices "
            f"(e.g. --config.{name}={max(ndev, bs // ndev * ndev)})")
  if "://" in config.data.get("data_dir", ""):
    raise errors.UserError(
        f"--config.data.data_dir={config.data.data_dir}: datasets are read from a local "
        "disk or a mount (NFS, gcsfuse), not from a URL; copy the prepared dataset there")
  registry.check_config(config)


def check_remote_workdir(workdir: str) -> None:
  """A gs://bucket/path workdir: writes and deletes a probe object; a wrong scheme, a
  missing bucket or no write access is one UserError."""
  from structvit_jax import paths
  scheme = workdir.split("://", 1)[0]
  if scheme != "gs" or not workdir[len("gs://"):].strip("/"):
    raise errors.UserError(f"--workdir={workdir}: a URL workdir must be gs://BUCKET[/PATH] "
                           "(Cloud Storage); other schemes are not supported")
  probe = f"{workdir.rstrip('/')}/.write_test_{uuid.uuid4().hex}"
  try:
    paths.write_text(probe, "")
    paths.remove(probe)
  except Exception as e:  # noqa: BLE001  (gcsfs raises OSError, HttpError, auth errors)
    cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise errors.UserError(
        f"--workdir={workdir} is not writable ({cause}); check "
        "the bucket exists and your credentials may write to it (gcloud auth "
        "application-default login, or the VM's service account)") from e


def check_workdir(workdir: str) -> None:
  """Creates workdir; a file or an unwritable place is one UserError."""
  if "://" in workdir:
    check_remote_workdir(workdir)
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError(f"--workdir={workdir} is a file, not a directory; give a new "
                           "or existing directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{uuid.uuid4().hex}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise errors.UserError(f"--workdir={workdir} is not writable ({e.strerror}); give a "
                           "directory on a writable disk") from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  config = FLAGS.config
  if FLAGS.coordinator_address:
    config.distributed.enabled = True
    config.distributed.coordinator_address = FLAGS.coordinator_address
  if FLAGS.num_processes is not None:
    config.distributed.num_processes = FLAGS.num_processes
  if FLAGS.process_id is not None:
    config.distributed.process_id = FLAGS.process_id
  check_config(config)
  check_workdir(FLAGS.workdir)
  cache_dir = compile_cache.setup(config.get("compilation_cache_dir", "auto"))
  overrides = " ".join(a for a in sys.argv[1:] if a.startswith("--config"))
  if config.eval_only:
    logging.info("Config: %s\n%s", overrides, config)
    train.evaluate(config, FLAGS.workdir)
  else:
    # The trainer writes every value to WORKDIR/config.json: the log names the flags only.
    logging.info("Config: %s; all values in %s", overrides,
                 os.path.join(FLAGS.workdir, "config.json"))
    train.train_and_evaluate(config, FLAGS.workdir)
  counts = compile_cache.counts()
  logging.info("Compilation cache %s: %d XLA programs, %d read from the cache, %d compiled",
               cache_dir or "off", counts["programs"], counts["hits"],
               counts["programs"] - counts["hits"])
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


if __name__ == "__main__":
  errors.quiet_library_logs()
  errors.run(main, check_argv=config_utils.check_config_argv)
