"""The run log: TensorBoard event files (tensorboardX, process 0 only), eval_results.jsonl,
and the console lines (training progress with throughput and ETA; eval results)."""

import json
import os
import time
from typing import Mapping

from absl import logging
import jax

from structvit_jax import paths
from structvit_jax.workdir import Workdir


def read_eval_records(workdir: str) -> list[dict]:
  """The records of <workdir>/eval_results.jsonl (empty when there is none)."""
  path = Workdir(workdir).eval_results
  if not paths.isfile(path):
    return []
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


class MetricWriter:
  """Writes scalars to <workdir>/tensorboard on process 0; a no-op elsewhere.

  With a gs:// workdir the event file is written to a local temporary directory and copied
  to <workdir>/tensorboard (`sync`) at most every `sync_every_s` seconds, at every eval
  record and at close: GCS has no append, so each copy uploads the whole file, and
  tensorboardX's own gs:// writer would upload it at every log step."""

  def __init__(self, workdir: str, sync_every_s: float = 60.0):
    self.writer = None
    self.workdir = workdir
    self._remote = paths.is_remote(workdir)
    self._sync_every_s = sync_every_s
    self._synced_at = time.monotonic()
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # only process 0 needs it
      if self._remote:
        import tempfile
        self._local_dir = tempfile.mkdtemp(prefix="structvit_tb_")
        # The pid keeps two writers started in the same second (the file name has the
        # time in seconds and the host) from replacing each other's file in the bucket.
        self.writer = SummaryWriter(logdir=self._local_dir, filename_suffix=f".{os.getpid()}")
      else:
        self.writer = SummaryWriter(logdir=Workdir(workdir).tensorboard)

  def sync(self) -> None:
    """Copies the local event files of a gs:// workdir to <workdir>/tensorboard."""
    if self.writer is None or not self._remote:
      return
    self.writer.flush()
    for name in os.listdir(self._local_dir):
      paths.copy_file(os.path.join(self._local_dir, name),
                      os.path.join(Workdir(self.workdir).tensorboard, name))
    self._synced_at = time.monotonic()

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self.writer is None:
      return
    for k, v in values.items():
      self.writer.add_scalar(k, float(v), step)
    self.writer.flush()
    if self._remote and time.monotonic() - self._synced_at >= self._sync_every_s:
      self.sync()

  def eval_record(self, step: int, results: Mapping[str, float]) -> None:
    """Appends {'step', **results} to <workdir>/eval_results.jsonl (scripts, notebooks)."""
    if self.writer is not None:
      # Rewritten whole and renamed (write_atomic): a full disk never truncates the records.
      path = Workdir(self.workdir).eval_results
      old = paths.read_text(path) if paths.isfile(path) else ""
      if old and not old.endswith("\n"):
        old += "\n"
      record = {"step": int(step), **{k: float(v) for k, v in results.items()}}
      paths.write_atomic(path, old + json.dumps(record) + "\n")
      self.sync()

  def text(self, tag: str, value: str, step: int = 0) -> None:
    if self.writer is not None:
      self.writer.add_text(tag, value, step)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      if self._remote:
        try:
          self.sync()
        finally:
          import shutil
          shutil.rmtree(self._local_dir, ignore_errors=True)
      self.writer = None


class Progress:
  """Step time, examples/s and ETA between log points (excludes eval/checkpoint pauses
  when `pause()`/`resume()` bracket them), and data_wait: the fraction of that time the
  loop spent blocked on the input pipeline (`add_data_time`). The loop dispatches one step
  ahead, so loading overlaps the previous step's compute: ~0 means compute bound, ~1 input
  bound."""

  def __init__(self, total_steps: int, global_batch: int, first_step: int):
    self.total_steps = total_steps
    self.global_batch = global_batch
    self.last_step = first_step
    self.last_time = time.perf_counter()
    self.paused = 0.0
    self.data_time = 0.0
    self._pause_start = None

  def add_data_time(self, seconds: float) -> None:
    self.data_time += seconds

  def pause(self) -> None:
    self._pause_start = time.perf_counter()

  def add_pause(self, seconds: float) -> None:
    """Excludes `seconds` (e.g. the first step's compile) from step time and ETA."""
    self.paused += seconds

  def resume(self) -> None:
    if self._pause_start is not None:
      self.paused += time.perf_counter() - self._pause_start
      self._pause_start = None

  def tick(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps = max(step - self.last_step, 1)
    dt = max(now - self.last_time - self.paused, 1e-9)
    data_wait = min(self.data_time / dt, 1.0)
    self.last_step, self.last_time, self.paused, self.data_time = step, now, 0.0, 0.0
    step_time = dt / steps
    return dict(step_time=step_time, examples_per_sec=self.global_batch / step_time,
                eta_min=(self.total_steps - step) * step_time / 60, data_wait=data_wait)


def console_line(step: int, total: int, m: Mapping[str, float]) -> str:
  """The training progress line: a bar, the averaged metrics, throughput, data wait, ETA."""
  width = 20
  done = int(width * step / max(total, 1))
  bar = "#" * done + "." * (width - done)
  return (f"[{bar}] step {step}/{total} loss {m['loss']:.4f} top1 {m['top1']:.3f} "
          f"top5 {m['top5']:.3f} lr {m['lr']:.3e} gnorm {m['grad_norm']:.3f} "
          f"{m['examples_per_sec']:.1f} ex/s {m['step_time'] * 1e3:.0f} ms/step "
          + (f"data_wait {m['data_wait']:.0%} " if "data_wait" in m else "")
          + f"ETA {m['eta_min']:.1f} min")


def eval_line(prefix: str, step: int, m: Mapping[str, float]) -> str:
  """An eval's console line from its result (evaluation.py's metrics)."""
  extra = f" mean_class_top1 {m['mean_class_top1']:.4f}" if "mean_class_top1" in m else ""
  bad = int(m.get("bad_examples", 0))
  return (f"{prefix} step {step}: loss {m['loss']:.4f} top1 {m['top1']:.4f} top5 "
          f"{m['top5']:.4f}{extra} over {int(m['count'])} "
          + ("videos" if "views" in m else "examples")
          + (f" ({bad} unreadable, left out)" if bad else ""))


def log_console(line: str) -> None:
  if jax.process_index() == 0:
    logging.info("%s", line)
