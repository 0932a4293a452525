"""Entry point: python -m structvit_jax.main --config=configs/demo.py --workdir=DIR.

Variants through the config string (configs/in1k_s.py:d=8,stride=1), overrides with
--config.x=y. The multi-host flags override config.distributed for launchers.
A mistake in the flags or config is one `error:` line and exit status 2; a fault of the run
(non-finite loss, disk full) one line and status 1; --verbose shows tracebacks
(structvit_jax/cli.py). Compiled programs go to a persistent cache
(config.compilation_cache_dir, structvit_jax/compile_cache.py): a restart compiles nothing.
"""

import os
import sys
import uuid

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from structvit_jax import compile_cache
from structvit_jax import cli
from structvit_jax import config_checks
from structvit_jax import train
from structvit_jax.workdir import Workdir

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard events.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def check_workdir(workdir: str) -> None:
  """Creates workdir and writes and deletes a probe file there: a file, a URL other than
  gs://BUCKET[/PATH], a missing bucket or no write access is one UserError."""
  from structvit_jax import paths
  remote = paths.is_remote(workdir)
  if remote and (workdir.split("://", 1)[0] != "gs" or not workdir[len("gs://"):].strip("/")):
    raise cli.UserError(f"--workdir={workdir}: a URL workdir must be gs://BUCKET[/PATH] "
                        "(Cloud Storage); other schemes are not supported")
  if not remote and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise cli.UserError(f"--workdir={workdir} is a file, not a directory; give a new "
                        "or existing directory")
  probe = f"{workdir.rstrip('/')}/.write_test_{uuid.uuid4().hex}"
  try:
    paths.makedirs(workdir)
    paths.write_text(probe, "")
    paths.remove(probe)
  except Exception as e:  # noqa: BLE001  (gcsfs raises OSError, HttpError, auth errors)
    if not remote:
      if not isinstance(e, OSError):
        raise
      raise cli.UserError(f"--workdir={workdir} is not writable ({e.strerror}); give a "
                          "directory on a writable disk") from e
    cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise cli.UserError(
        f"--workdir={workdir} is not writable ({cause}); check "
        "the bucket exists and your credentials may write to it (gcloud auth "
        "application-default login, or the VM's service account)") from e


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
  config_checks.check_config(config)
  check_workdir(FLAGS.workdir)
  cache_dir = compile_cache.setup(config.get("compilation_cache_dir", "auto"))
  overrides = " ".join(a for a in sys.argv[1:] if a.startswith("--config"))
  if config.eval_only:
    logging.info("Config: %s\n%s", overrides, config)
    train.evaluate(config, FLAGS.workdir)
  else:
    # The trainer writes every value to WORKDIR/config.json: the log names the flags only.
    logging.info("Config: %s; all values in %s", overrides,
                 Workdir(FLAGS.workdir).config_json)
    train.train_and_evaluate(config, FLAGS.workdir)
  counts = compile_cache.counts()
  logging.info("Compilation cache %s: %d XLA programs, %d read from the cache, %d compiled",
               cache_dir or "off", counts["programs"], counts["hits"],
               counts["programs"] - counts["hits"])
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


if __name__ == "__main__":
  cli.quiet_library_logs()
  cli.run(main, check_argv=config_checks.check_config_argv)
