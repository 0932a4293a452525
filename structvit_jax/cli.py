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

import ast
import datetime
import os
import sys
import traceback
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging

from structvit_jax import paths
from structvit_jax.workdir import Workdir

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
  try:
    if flags.FLAGS.is_parsed() and "verbose" in flags.FLAGS:
      return bool(flags.FLAGS.verbose)
  except Exception:  # noqa: BLE001 (flags half-parsed)
    pass
  return any(a in ("--verbose", "-verbose", "--verbose=true", "--verbose=1") for a in argv)


def _write_log(workdir: str | None, argv: Sequence[str]) -> str | None:
  """Appends the current exception's traceback to WORKDIR/error.log; returns the path."""
  if not workdir:
    return None
  path = Workdir(workdir).error_log
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
      if _verbose(args):
        traceback.print_exc()
      print(f"error: {_one_line(known[1])}", file=sys.stderr, flush=True)
      sys.exit(known[0])

  def wrapped(args: list[str]) -> Any:
    workdir = FLAGS[workdir_flag].value if workdir_flag and workdir_flag in FLAGS else None
    if workdir and any(isinstance(f, _LibraryNoise)
                       for f in absl_logging.get_absl_handler().filters):
      library_log.set_path(Workdir(workdir).library_log)
    try:
      return main(args)
    except (SystemExit, KeyboardInterrupt):
      raise
    except Exception as e:  # noqa: BLE001
      sys.exit(report(e, args, workdir))
    finally:
      library_log.flush()

  app.run(wrapped, argv=argv, flags_parser=parse)


# Library log lines and tracebacks go to WORKDIR/library.log, not to the console (README,
# "Faults on resume"). Orbax logs every save and restore step at INFO (about 25 lines a
# checkpoint: dropped), and when a damaged step is read (which checkpoint.py then skips with
# one warning of its own) its warnings, errors and tracebacks; so do asyncio ("Task exception
# was never retrieved", e.g. the background writes of a save to a full disk, which
# checkpoint.py reports as one error line) and TensorStore's callbacks into a closed event
# loop (unraisable exceptions). With --verbose they are also shown on the console.
_LIBRARIES = tuple(f"{os.sep}{name}{os.sep}" for name in ("orbax", "asyncio", "tensorstore",
                                                           "etils"))
# Warnings that are not worth even the log file: a sub-item without _CHECKPOINT_METADATA
# read on its own (export, predict), our jax.Array handler replacing Orbax's (on purpose).
_QUIET_WARNINGS = ("Metadata file does not exist", "Type handler registry type")


class _LibraryLog:
  """Where library records go: a file (appended locally; on gs:// kept in memory and
  written by flush()), or nowhere until a workdir is known."""

  def __init__(self):
    self.path: str | None = None
    self._pending: list[str] = []

  def set_path(self, path: str | None) -> None:
    self.path = path
    self.flush()

  def write(self, text: str) -> None:
    self._pending.append(text if text.endswith("\n") else text + "\n")
    if self.path and "://" not in self.path:
      self.flush()

  def flush(self) -> None:
    if not self.path or not self._pending:
      return
    text, self._pending = "".join(self._pending), []
    try:
      if paths.isdir(os.path.dirname(self.path)):
        paths.append_text(self.path, text)
    except Exception:  # noqa: BLE001  (a full disk: the log is not worth an error)
      pass


library_log = _LibraryLog()


def _format_record(record: Any) -> str:
  stamp = datetime.datetime.fromtimestamp(record.created).isoformat(timespec="seconds")
  text = f"{stamp} {record.levelname} {record.pathname}:{record.lineno}: {record.getMessage()}"
  if record.exc_info:
    text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
  return text


class _LibraryNoise:
  """logging.Filter for the absl handler: library records (orbax, asyncio, tensorstore,
  etils) at WARNING or above go to `library_log`; below WARNING they are dropped. On the
  console they appear only with `console=True` (--verbose), with their tracebacks."""

  def __init__(self, console: bool = False):
    self.console = console

  def filter(self, record: Any) -> bool:
    if not any(lib in record.pathname for lib in _LIBRARIES):
      return True
    if record.levelno < 30:  # below WARNING
      return False
    if str(record.msg).startswith(_QUIET_WARNINGS):
      return False
    try:
      library_log.write(_format_record(record))
    except Exception:  # noqa: BLE001
      pass
    return self.console


def _unraisable_to_log(unraisable: Any) -> None:
  """sys.unraisablehook: TensorStore's callbacks into Orbax's closed event loops after a
  failed read raise where nobody can catch them; they go to the library log."""
  exc = unraisable.exc_value
  text = "".join(traceback.format_exception(type(exc), exc, unraisable.exc_traceback))
  library_log.write(f"unraisable exception in {unraisable.object!r}:\n{text.rstrip()}")


def quiet_library_logs(workdir: str | None = None) -> None:
  """Routes library records and unraisable exceptions to WORKDIR/library.log (command lines
  call it; cli.run sets the workdir once the flags are parsed)."""
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _LibraryNoise) for f in handler.filters):
    handler.addFilter(_LibraryNoise(console=_verbose(sys.argv)))
  if not _verbose(sys.argv):
    sys.unraisablehook = _unraisable_to_log
  if workdir:
    library_log.set_path(Workdir(workdir).library_log)


def parse_overrides(items: list[str]) -> dict[str, Any]:
  """`--set FIELD=VALUE` flags -> get_model overrides; values are Python literals, or bare
  strings such as aggregation=element."""
  out = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set d=8")
    key, value = item.split("=", 1)
    try:
      out[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key.strip()] = value
  return out
