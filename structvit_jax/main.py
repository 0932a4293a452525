"""Entry point: python -m structvit_jax.main --config=configs/demo.py --workdir=DIR.

Variants through the config string (configs/in1k_s.py:d=8,stride=1), overrides with
--config.x=y. The multi-host flags override config.distributed for launchers.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from structvit_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard events.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


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
  logging.info("Config:\n%s", config)
  try:
    if config.eval_only:
      train.evaluate(config, FLAGS.workdir)
    else:
      train.train_and_evaluate(config, FLAGS.workdir)
  except (FileNotFoundError, FloatingPointError) as e:
    # Missing dataset / checkpoint, non-finite loss: the message says what and how to fix it.
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


if __name__ == "__main__":
  app.run(main)
