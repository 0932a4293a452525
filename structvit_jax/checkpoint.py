"""Orbax checkpoints of the train state together with the grain data-iterator state.

Layout: <dir>/<step>/state/ (params, opt_state, batch_stats, EMA, step, RNG) and
<dir>/<step>/data_iter/process_<i>-of-<n>.json (one file per process). Saves are async;
restores take a sharded target (docs/platform_notes.md, "Checkpoints (Orbax)").

Steps are listed by Orbax's step-name format (`list_steps`), so a step renamed
`<step>.unusable-<reason>` (README.md, "Faults on resume") is no longer one.
"""

import contextlib
import json
import os
import signal
import threading
from typing import Any, Callable

from absl import logging
import grain
import grain.checkpoint  # noqa: F401  (registers CheckpointSave/Restore with orbax)
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from structvit_jax import checksums as checksums_lib
from structvit_jax import cli
from structvit_jax import paths
from structvit_jax.workdir import Workdir

_single_process_handler = False


class CheckpointError(cli.RunError, RuntimeError):
  """A checkpoint that cannot be used or written; the one-line message says which, why and
  what to do (exit status 1)."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint written by another model or another run configuration: a mistake in the
  invocation, so exit status 2."""
  exit_status = 2


class CheckpointSaveError(CheckpointError):
  """An (async) save that failed: the message names the path and the cause."""


def list_steps(directory: str) -> list[int]:
  """The finished checkpoint steps in `directory`, ascending, by Orbax's step-name format
  (the one CheckpointManager uses): temporary and renamed-unusable directories excluded."""
  paths.forget_listings(directory)  # gs://: steps other processes saved since the last look
  if not paths.isdir(directory):
    return []
  return sorted(m.step for m in ocp.step.standard_name_format().find_all(directory))


def _paths(tree: Any) -> dict[str, tuple[int, ...]]:
  """'a/b/c' -> shape for every leaf (arrays, ShapeDtypeStructs, Orbax ArrayMetadata)."""
  return {checksums_lib.leaf_name(path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_difference(expected: Any, found: Any, what: str = "the model",
                    where: str = "the checkpoint") -> str | None:
  """None when both trees have the same leaf paths and shapes, else the first difference
  in words."""
  a, b = _paths(expected), _paths(found)
  missing = sorted(set(a) - set(b))
  extra = sorted(set(b) - set(a))
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"{len(missing)} arrays of {what} not in {where} (e.g. {missing[0]})")
    if extra:
      parts.append(f"{len(extra)} arrays in {where} not in {what} (e.g. {extra[0]})")
    return "; ".join(parts)
  for k in sorted(a):
    if a[k] != b[k]:
      return f"{k} has shape {b[k]} in {where} but {a[k]} in {what}"
  return None


def state_metadata(state_dir: str) -> Any:
  """The array metadata tree (shapes, dtypes) of an Orbax StandardSave at `state_dir`.

  Read with the handler, not a Checkpointer: a damaged index raises here (a Checkpointer
  logs a warning and returns None), and there is no cross-process barrier to leave the
  other processes waiting at when this one fails."""
  with contextlib.closing(ocp.StandardCheckpointHandler()) as handler:
    metadata = handler.metadata(paths.epath(state_dir))
  if metadata is None:
    raise ValueError(f"no array metadata in {state_dir}")
  return metadata


def restore_items(step_dir: str, abstract_state: Any, data_iter: Any = None) -> Any:
  """The state of a step (into `abstract_state`'s shardings), and the data iterator restored
  in place. Through the handlers, not the CheckpointManager: its restore ends at a barrier
  that a process whose read failed never reaches (the others would wait there while it
  asks them whether to fall back); Checkpointer.restore agrees on the outcome instead."""
  with contextlib.closing(ocp.StandardCheckpointHandler()) as handler:
    state = handler.restore(paths.epath(os.path.join(step_dir, "state")),
                            args=ocp.args.StandardRestore(abstract_state))
  if data_iter is not None:
    from grain._src.python.checkpoint import handler as grain_handler
    grain_handler.CheckpointHandler().restore(
        paths.epath(os.path.join(step_dir, "data_iter")),
        args=grain.checkpoint.CheckpointRestore(data_iter))
  return state


def read_checksums(step_dir: str) -> dict | None:
  """The step's checksums record (checksums.py), None for a step saved before they were kept
  (no checksums/ item); raises checksums.Mismatch when the record is missing or damaged."""
  item = os.path.join(step_dir, checksums_lib.ITEM)
  if not paths.isdir(item):
    return None
  try:
    text = paths.read_text(os.path.join(item, "metadata"))
  except Exception as e:  # noqa: BLE001
    raise checksums_lib.Mismatch(f"its checksums file does not read ({short_cause(e)})") from None
  return checksums_lib.parse(text)


def data_iter_name() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def check_data_iter(step_dir: str, record: dict, name: str | None = None) -> None:
  """Raises checksums.Mismatch when this process's (or `name`'s) data-iterator file differs
  from its checksum."""
  name = name or data_iter_name()
  expected = record.get("data_iter", {}).get(name)
  if expected is None:
    raise checksums_lib.Mismatch(f"data_iter/{name} has no checksum")
  with paths.epath(os.path.join(step_dir, "data_iter", name)).open("rb") as f:
    found = checksums_lib.text_digest(f.read())
  if found != expected:
    raise checksums_lib.Mismatch(f"file data_iter/{name} does not match its checksum")


def restore_arrays(path: str) -> dict[str, Any]:
  """An Orbax StandardCheckpointer save, every array on one device. A damaged save raises
  (state_metadata, restore_items: Orbax's handlers, no barriers)."""
  # Every array onto one device, whatever topology saved it.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        state_metadata(path))
  with contextlib.closing(ocp.StandardCheckpointHandler()) as handler:
    return handler.restore(paths.epath(path), args=ocp.args.StandardRestore(target))


def _read_step(directory: str, step: int) -> tuple[Any, dict | None]:
  """(every array of the step on one device, its checksums record or None when it has
  none), the arrays checked against the record; CheckpointError(why) for an unusable step."""
  step_dir = os.path.join(paths.abspath(directory), str(step))
  bad = unusable_reason(step_dir, with_data_iter=False)
  if bad is not None:
    raise CheckpointError(bad[1])
  try:
    record = read_checksums(step_dir)
    tree = restore_arrays(os.path.join(step_dir, "state"))
    if record is not None:
      checksums_lib.check_arrays(record["arrays"], tree)
  except checksums_lib.Mismatch as e:
    raise CheckpointError(str(e)) from None
  except Exception as e:  # noqa: BLE001  (any damage: the step is unusable)
    raise CheckpointError(f"it does not restore ({short_cause(e)})") from None
  return tree, record


def read_step_arrays(directory: str, step: int) -> Any:
  """Every array of checkpoint `step` in `directory` on one device (export, init_from),
  checked against the step's checksums; raises CheckpointError(why) for an unusable step.
  Logs one line when the step has no checksums (unverified)."""
  tree, record = _read_step(directory, step)
  if record is None:
    logging.warning("Checkpoint step %d in %s has no checksums (saved before they were "
                    "kept): unverified.", step, directory)
  return tree


def verify_step(directory: str, step: int) -> tuple[str, str]:
  """('ok' | 'unverified' | 'unusable', details) for checkpoint `step` in `directory`: its
  arrays restored and checked against their checksums, and every process's data-iterator
  file against its digest."""
  step_dir = os.path.join(paths.abspath(directory), str(step))
  try:
    tree, record = _read_step(directory, step)
    if record is not None:
      for name in sorted(record.get("data_iter", {})):
        check_data_iter(step_dir, record, name)
  except (checksums_lib.Mismatch, CheckpointError) as e:
    return "unusable", str(e)
  except Exception as e:  # noqa: BLE001
    return "unusable", f"it does not read ({short_cause(e)})"
  n = len(jax.tree.leaves(tree))
  if record is None:
    return "unverified", f"{n} arrays restore; no checksums (saved before they were kept)"
  k = len(record.get("data_iter", {}))
  return "ok", f"{n} arrays" + (f" and {k} data-iterator files" if k else "") + \
      " match their checksums"


def verify(path: str) -> tuple[list[str], bool]:
  """(one line per checkpoint step, or one for an export; whether the newest is usable).
  `path`: a training workdir, its checkpoints/ directory, or an export."""
  if paths.isfile(os.path.join(path, "model.json")):
    try:
      tree = restore_arrays(os.path.join(paths.abspath(path), "params"))
      verified = checksums_lib.check_export(path, tree)
    except checksums_lib.Mismatch as e:
      return [f"export {path}: unusable: {e}"], False
    except Exception as e:  # noqa: BLE001
      return [f"export {path}: unusable: its arrays do not restore ({short_cause(e)})"], False
    n = len(jax.tree.leaves(tree))
    return [f"export {path}: " + (f"ok: {n} arrays match their checksums" if verified else
            f"unverified: {n} arrays restore; no {checksums_lib.EXPORT_FILE} (written before "
            "checksums were kept)")], True
  directory = Workdir(path).checkpoints_or_self()
  steps = list_steps(directory)
  if not steps:
    raise CheckpointError(f"no checkpoint in {directory} (nor an export: no model.json in "
                          f"{path})")
  lines, newest_ok = [], True
  for step in reversed(steps):
    status, details = verify_step(directory, step)
    lines.append(f"step {step}: {status}: {details}")
    if step == steps[-1]:
      newest_ok = status != "unusable"
  moved = sorted(n for n in paths.listdir(directory) if ".unusable-" in n)
  if moved:
    lines.append(f"moved aside earlier (not checked): {', '.join(moved)}")
  return lines, newest_ok


def _cli() -> None:
  """python -m structvit_jax.checkpoint --verify --workdir=DIR (README, "Verifying
  checkpoints"): exit status 1 when the newest step is unusable."""
  import sys
  from absl import app
  from absl import flags
  flags.DEFINE_bool("verify", False, "Check every checkpoint step (or an export) against "
                    "its checksums.")
  flags.DEFINE_string("workdir", None, "A training workdir, its checkpoints/ or an export.")
  flags.mark_flags_as_required(["workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    if not flags.FLAGS.verify:
      raise app.UsageError("nothing to do: pass --verify")
    logging.set_verbosity(logging.WARNING)
    lines, newest_ok = verify(flags.FLAGS.workdir)
    for line in lines:
      print(line, flush=True)
    if not newest_ok:
      sys.exit(1)

  cli.quiet_library_logs()
  cli.run(main)


def unusable_reason(step_dir: str, with_data_iter: bool) -> tuple[str, str] | None:
  """(short tag, explanation) for what is visibly missing in a step directory, else None."""
  state = os.path.join(step_dir, "state")
  if not paths.isdir(step_dir) or not paths.listdir(step_dir):
    return "empty", "the step directory is empty"
  if not paths.isdir(state):
    return "no-state", "it has no state/ directory"
  if not paths.isfile(os.path.join(state, "_METADATA")):
    return "no-metadata", "state/_METADATA is missing"
  if not paths.isfile(os.path.join(state, "manifest.ocdbt")):
    return "no-manifest", "state/manifest.ocdbt is missing"
  if not any(files for root, _, files in paths.walk(state) if os.path.basename(root) == "d"):
    return "no-arrays", "its array files (state/**/d/) are gone"
  if with_data_iter:
    name = data_iter_name()
    if not paths.isfile(os.path.join(step_dir, "data_iter", name)):
      return "no-data-iter", f"data_iter/{name} (the input position) is missing"
  return None


def short_cause(e: BaseException) -> str:
  """A short cause: the innermost OSError if any (e.g. No space left on device), else the
  first line of the message."""
  seen, cur = set(), e
  while cur is not None and id(cur) not in seen:
    seen.add(id(cur))
    if isinstance(cur, OSError) and cur.errno:
      return f"{os.strerror(cur.errno)}" + (f": {cur.filename}" if cur.filename else "")
    cur = cur.__cause__ or cur.__context__
  text = str(e).strip().splitlines()
  line = text[0] if text else type(e).__name__
  line = line.split(" See full TensorStore details")[0]
  if "No space left on device" in str(e):
    return "No space left on device"
  return f"{type(e).__name__}: {line[:300]}"


def _on_any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process; every process must call it (a collective)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _data_iter_digests(data_iter: Any) -> dict[str, str]:
  """{'process_<i>-of-<n>.json': digest of the text grain writes for that process's iterator}
  (a collective with several processes)."""
  if data_iter is None:
    return {}
  # The exact text grain's checkpoint handler writes for `data_iter` (grain.checkpoint).
  from grain._src.python.dataset import dataset
  digest = checksums_lib.text_digest(
      json.dumps(data_iter.get_state(), indent=4)
      if isinstance(data_iter, dataset.DatasetIterator) else data_iter.get_state().decode())
  n = jax.process_count()
  if n == 1:
    return {data_iter_name(): digest}
  every = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(digest), np.uint8))
  return {f"process_{i}-of-{n}.json": bytes(np.asarray(every[i], np.uint8)).hex()
          for i in range(n)}


def _try_restore(directory: str, s: int, abstract_state: Any, data_iter: Any,
                 check: Callable[[int, Any], None] | None, checksums: bool
                 ) -> tuple[Any, tuple[str, str] | None, bool]:
  """(restored items, None, unverified) or (None, (tag, why), _) for step `s` of
  `directory` (Checkpointer.restore's fallback policy tries each in turn). Any
  exception while reading the step (its metadata, checksums, arrays, input position)
  makes it unusable; only a CheckpointMismatchError (another model) is raised. Every
  process calls it and gets the same verdict."""
  step_dir = os.path.join(directory, str(s))
  bad = unusable_reason(step_dir, data_iter is not None)
  record = metadata = None
  if bad is None:
    try:
      metadata = state_metadata(os.path.join(step_dir, "state"))  # raises for no metadata
    except Exception as e:  # noqa: BLE001
      bad = "unreadable", f"its metadata does not read ({short_cause(e)})"
  if bad is None:
    try:
      record = read_checksums(step_dir) if checksums else None
      if record is not None and data_iter is not None:
        check_data_iter(step_dir, record)
    except checksums_lib.Mismatch as e:
      bad = "checksum", str(e)
    except Exception as e:  # noqa: BLE001
      bad = "unreadable", f"its checksums do not read ({short_cause(e)})"
  # Every process restores the same step or skips it together (a restore is collective):
  # a step that one process cannot use (its data_iter file, a read error) is unusable
  # for all.
  if _on_any_process(bad is not None) and bad is None:
    bad = "unreadable", "another process cannot use it (see that process's log)"
  if bad is not None:
    return None, bad, False
  try:
    if check is not None:
      check(s, metadata)
    elif (diff := tree_difference(
        {"params": abstract_state.params}, {"params": metadata["params"]})):
      raise CheckpointMismatchError(
          f"checkpoint step {s} in {directory} does not fit the model: {diff}")
  except CheckpointMismatchError:
    raise
  except Exception as e:  # noqa: BLE001  (a damaged metadata tree)
    bad = "unreadable", f"its metadata does not read ({short_cause(e)})"
  out = None
  if bad is None:
    try:
      out = {"state": restore_items(step_dir, abstract_state, data_iter)}
    except Exception as e:  # noqa: BLE001  (damaged files: fall back)
      bad = "unreadable", f"it does not restore ({short_cause(e)})"
  if _on_any_process(bad is not None) and bad is None:
    bad = "unreadable", "another process could not restore it (see that process's log)"
  if bad is None and record is not None:
    try:  # the same fingerprints on every process (one collective over the global arrays)
      checksums_lib.check_arrays(record["arrays"], out["state"])
    except checksums_lib.Mismatch as e:
      bad = "checksum", str(e)
  if bad is not None:
    return None, bad, False
  return out, None, record is None and checksums


class Checkpointer:
  """A CheckpointManager on `directory`: async saves, keeps the newest `keep`."""

  def __init__(self, directory: str, keep: int = 3, read_only: bool = False,
               checksums: bool = True):
    self.directory = directory
    self.read_only = read_only
    # False only to measure what checksums cost (benchmarks/checkpoint_checksums.py): saves
    # write none, restores check none.
    self.checksums = checksums
    global _single_process_handler
    if jax.process_count() == 1 and not _single_process_handler:
      _single_process_handler = True
      # Replica-parallel saving slices every replicated array with a small jitted op per
      # shape (seconds of compiles on the first save with many devices) and only pays off
      # when several hosts share the writing.
      ocp.type_handlers.register_type_handler(
          jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
          override=True)
    self.manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, read_only=read_only,
            create=not read_only,
            # '<step>.orbax-checkpoint-tmp-*' left by a killed save is never a checkpoint.
            cleanup_tmp_directories=not read_only))
    self._saving: int | None = None   # the step of the async save in flight
    self._failed = False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _raise_save_error(self, e: BaseException) -> None:
    self._failed = True
    step, self._saving = self._saving, None
    good = [s for s in list_steps(self.directory) if s != step]
    raise CheckpointSaveError(
        f"saving checkpoint step {step} to {os.path.join(self.directory, str(step))} "
        f"failed: {short_cause(e)}. The last good checkpoint is "
        + (f"step {good[-1]}" if good else "none") + f" in {self.directory}.") from e

  def save(self, step: int, state: Any, data_iter: Any = None) -> None:
    """Starts an async save of `state` (and the iterator state, written synchronously).
    Raises CheckpointSaveError when this save or the previous async one failed."""
    if self.manager.latest_step() == step:
      return
    items = dict(state=ocp.args.StandardSave(state))
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    # Written in the same commit as the state (checksums.py): every process computes the
    # same array fingerprints; the data-iterator digests are gathered from all processes.
    if self.checksums:
      items[checksums_lib.ITEM] = ocp.args.JsonSave(checksums_lib.record(
          checksums_lib.fingerprints(state), _data_iter_digests(data_iter)))
    self.wait()  # a failed previous save is reported as that save, before starting another
    self._saving = step
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # noqa: BLE001  (disk full, permissions: one line, below)
      self._raise_save_error(e)
    logging.info("Checkpoint: saving step %d to %s (async)", step, self.directory)

  def _move_aside(self, step: int, tag: str) -> str:
    src = os.path.join(self.directory, str(step))
    dst, i = f"{src}.unusable-{tag}", 1
    while paths.exists(dst):
      i += 1
      dst = f"{src}.unusable-{tag}-{i}"
    paths.rename(src, dst)  # on GCS: a copy of every object, then a delete
    return dst

  def restore(self, abstract_state: Any, step: int | None = None,
              data_iter: Any = None, fallback: bool = True,
              check: Callable[[int, Any], None] | None = None) -> tuple[Any, int]:
    """Restores into the structure/shardings of `abstract_state` (ShapeDtypeStructs with
    .sharding). Restores the data iterator in place when given. Returns (state, step).

    With `fallback` (and no `step`), a step that does not restore completely is skipped
    with one warning, moved aside as '<step>.unusable-<reason>' unless read-only, and the
    next older step is tried. `check(step, metadata)` may raise to refuse a step whose
    arrays do not fit (a CheckpointMismatchError is never a reason to fall back)."""
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; "
                              f"steps: {steps}")
      steps = [step]
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    skipped = []
    for s in reversed(steps):
      out, bad, unverified = _try_restore(self.directory, s, abstract_state, data_iter,
                                          check, self.checksums)
      if bad is None:
        if unverified:
          logging.warning("Checkpoint step %d in %s has no checksums (saved before they were "
                          "kept): restored unverified.", s, self.directory)
        logging.info("Checkpoint: restored step %d from %s", s, self.directory)
        return out["state"], s
      tag, why = bad
      older = [x for x in steps if x < s]
      if not fallback or step is not None:
        raise CheckpointError(
            f"checkpoint step {s} in {self.directory} is unusable: {why}"
            + (f"; an older step: {older[-1]}" if older else ""))
      where = "left in place (read-only)"
      if not self.read_only:
        where = (f"moved to {self._move_aside(s, tag)}" if jax.process_index() == 0
                 else "moved aside by process 0")
        if jax.process_count() > 1:  # every process lists the steps after the move
          multihost_utils.sync_global_devices(f"checkpoint-unusable-{s}")
        self.manager.reload()  # Orbax caches the step list: forget the moved step
      skipped.append(s)
      logging.warning("Checkpoint step %d in %s is unusable: %s; %s; %s.", s, self.directory,
                      why, where, f"trying step {older[-1]}" if older else "no older step")
    raise CheckpointError(
        f"no checkpoint in {self.directory} restores (unusable: steps {skipped}, moved "
        f"aside as <step>.unusable-*); run again to start from step 0, or restore them")

  def wait(self) -> None:
    """Waits for the async save; raises CheckpointSaveError (once) if it failed."""
    if self._failed:
      return
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      self._raise_save_error(e)
    self._saving = None

  def reached_preemption(self, step: int) -> bool:
    """Multi-host preemption sync point (all processes agree on the step)."""
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      if not self._failed:
        self.manager.close()


class SigtermFlag:
  """Sets a flag on SIGTERM so the loop can save, wait and exit 0 (single process).

  With several processes JAX's own preemption service handles SIGTERM and every process
  learns about it at the same step through Checkpointer.reached_preemption (a Python
  handler here would replace JAX's and let processes disagree), so it is not installed.
  """

  def __init__(self):
    self.event = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self.event.set()

  def is_set(self) -> bool:
    return self.event.is_set()

  def restore_handler(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


if __name__ == "__main__":
  from structvit_jax import checkpoint as _module  # the module others import, not __main__
  _module._cli()
