"""User mistakes versus bugs, and the top-level handler every command line shares.

A mistake in the invocation, the config or the input is one line on stderr,
`error: <what was wrong and how to fix it>`, and exit status 2; a fault of the run or its
environment (a damaged checkpoint, a full disk, a non-finite loss) is one such line and exit
status 1. A traceback is shown only with --verbose; for an unexpected exception (a bug) the
full traceback is also appended to WORKDIR/error.log when the command has a workdir.

What counts as a user mistake: a `UserError` (exit status `exit_status`), an absl flag or
usage error, and a ValueError / KeyError / FileNotFoundError raised by structvit_jax's own
code (its checks of configs and inputs raise those, with a message meant for the user).
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from typing import Any, Callable, Sequence

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
  """A mistake in the invocation, config or input; the message says how to fix it."""
  exit_status = 2


class RunError(UserError):
  """A run or its environment cannot go on (damaged checkpoint, disk full): exit status 1."""
  exit_status = 1


def _raised_by_us(e: BaseException) -> bool:
  tb = e.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep)


def _message(e: BaseException) -> str:
  if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
    return e.args[0]  # str(KeyError) quotes its message
  return str(e) or type(e).__name__


def classify(e: BaseException) -> tuple[int, str] | None:
  """(exit status, message) of an expected error; None for a bug."""
  from absl import app
  from absl import flags
  if isinstance(e, UserError):
    return e.exit_status, _message(e)
  if isinstance(e, (app.UsageError, flags.Error)):
    return 2, _message(e)
  if isinstance(e, (ValueError, KeyError, FileNotFoundError)) and _raised_by_us(e):
    return 2, _message(e)
  if isinstance(e, FloatingPointError):  # the trainer's non-finite loss check
    return 1, _message(e)
  if isinstance(e, OSError) and e.strerror:  # disk full, permissions, a vanished file
    where = f"{e.filename}: " if e.filename else ""
    return 1, f"{where}{e.strerror}"
  return None


def _one_line(text: str) -> str:
  return " ".join(text.split())


def _verbose(argv: Sequence[str]) -> bool:
  from absl import flags
  try:
    if flags.FLAGS.is_parsed() and "verbose" in flags.FLAGS:
      return bool(flags.FLAGS.verbose)
  except Exception:  # noqa: BLE001 (flags half-parsed)
    pass
  return any(a in ("--verbose", "-verbose", "--verbose=true", "--verbose=1") for a in argv)


def _write_log(workdir: str | None, argv: Sequence[str]) -> str | None:
  """Appends the current exception's traceback to WORKDIR/error.log; returns the path."""
  from structvit_jax import paths
  if not workdir:
    return None
  path = os.path.join(workdir, "error.log")
  try:
    if not paths.isdir(workdir):
      return None
    # A gs:// workdir has no append: paths.append_text rewrites the object.
    paths.append_text(path, f"--- {datetime.datetime.now().isoformat(timespec='seconds')} "
                      f"{' '.join(argv)}\n{traceback.format_exc()}\n")
  except Exception:  # noqa: BLE001  (a full disk, no bucket access: the error line suffices)
    return None
  return path


def report(e: BaseException, argv: Sequence[str], workdir: str | None = None) -> int:
  """Prints the one `error:` line for `e` (and the traceback with --verbose); returns the
  exit status."""
  verbose = _verbose(argv)
  known = classify(e)
  if verbose:
    traceback.print_exc()
  if known is not None:
    status, msg = known
    print(f"error: {_one_line(msg)}", file=sys.stderr, flush=True)
    return status
  log = _write_log(workdir, argv)
  where = (f"full traceback in {log}" if log else "") + (
      "" if verbose else (" or " if log else "") + "rerun with --verbose for the traceback")
  print(f"error: unexpected {type(e).__name__}: {_one_line(_message(e))} (a bug; {where})",
        file=sys.stderr, flush=True)
  return 1


def run(main: Callable[[list[str]], Any], *, check_argv: Callable[[list[str]], None] | None
        = None, workdir_flag: str | None = "workdir", argv: list[str] | None = None) -> None:
  """absl's app.run(main) with the handling of the module docstring.

  check_argv(argv) runs before the flags are parsed (e.g. to load --config itself and name
  a bad file or an unknown --config.field in one line); workdir_flag names the flag whose
  directory gets error.log.
  """
  from absl import app
  from absl import flags
  FLAGS = flags.FLAGS
  if "verbose" not in FLAGS:
    flags.DEFINE_bool("verbose", False, "Show the traceback of errors.")
  argv = list(sys.argv if argv is None else argv)

  def parse(args: list[str]) -> list[str]:
    try:
      if check_argv is not None:
        check_argv(args)
      return FLAGS(args)
    except Exception as e:  # noqa: BLE001  (flag and config errors: one line, status 2)
      known = classify(e)
      if known is None:  # e.g. an error inside a config file found only by the flag
        known = (2, f"bad command line: {type(e).__name__}: {e}")
        e = UserError(known[1])
      if _verbose(args):
        traceback.print_exc()
      print(f"error: {_one_line(known[1])}", file=sys.stderr, flush=True)
      sys.exit(known[0])

  def wrapped(args: list[str]) -> Any:
    try:
      return main(args)
    except (SystemExit, KeyboardInterrupt):
      raise
    except Exception as e:  # noqa: BLE001
      workdir = None
      if workdir_flag and workdir_flag in FLAGS:
        workdir = FLAGS[workdir_flag].value
      sys.exit(report(e, args, workdir))

  app.run(wrapped, argv=argv, flags_parser=parse)


# Library log lines that say nothing to a user: Orbax logs every save and restore step at
# INFO (about 25 lines a checkpoint), warns that a sub-item has no _CHECKPOINT_METADATA when
# a state directory is read on its own (export, predict: the step directory has it), and
# that our jax.Array handler replaces its default (checkpoint.py does so on purpose). A
# failed save (a full disk) makes each of its background threads log the same cause with a
# traceback; checkpoint.py turns it into one error line, so Orbax's errors keep their one
# line and lose the traceback (shown with --verbose).
_QUIET_WARNINGS = ("Metadata file does not exist", "Type handler registry type")


class _LibraryNoise:
  """logging.Filter for the absl handler: drops or shortens the lines above."""

  def __init__(self, tracebacks: bool = False):
    self.tracebacks = tracebacks

  def filter(self, record: Any) -> bool:
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    if record.levelno < 30:  # below WARNING
      return False
    if not self.tracebacks:
      record.exc_info, record.exc_text = None, None
    return not str(record.msg).startswith(_QUIET_WARNINGS)


def quiet_library_logs() -> None:
  """Installs the filter of _LibraryNoise on absl's log handler (command lines call it)."""
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _LibraryNoise) for f in handler.filters):
    handler.addFilter(_LibraryNoise(tracebacks=_verbose(sys.argv)))
