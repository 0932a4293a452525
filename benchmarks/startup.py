"""Start-up time of the trainer: time to the first finished training step, first run and
restart, with the persistent compilation cache (configs/base.py compilation_cache_dir).

  python benchmarks/startup.py --config=configs/demo.py
  python benchmarks/startup.py --config=configs/in1k_s.py -- --config.data.name=synthetic_image \
      --config.batch_size=8 --config.data.num_workers=0

Each run is `python -m structvit_jax.main` in a fresh workdir (no resume) with
num_train_steps=2 and a log line per step; it is stopped once the step-1 line is printed.
Run 1 starts on an empty cache directory, runs 2.. on what run 1 left there (a restart of a
preempted job, or a second job of the same config). Reported per run: wall seconds from
launch to the step-1 line, the process's CPU seconds by then (robust on a shared machine),
the trainer's own breakdown (the `Start-up:` log line: first batch, train-step compile and
init, side by side on 2+ usable cores, then the first step's run) and the number of files
in the cache. --cache_dir=off runs with
the cache off (compilation_cache_dir=''); --cache_dir=none passes no cache flag at all.
--repo runs another checkout's trainer (e.g. an older commit, with --cache_dir=none).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP1 = re.compile(r"\] step 1/")
BREAKDOWN = re.compile(r"Start-up: (.*)$")


def _cpu_seconds(pid: int) -> float:
  """utime + stime of a live process and its waited-for children (Linux /proc)."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _count(path: str) -> int:
  return sum(len(files) for _, _, files in os.walk(path)) if os.path.isdir(path) else 0


def run_once(config: str, extra: list[str], cache_flag: list[str], timeout: float,
             env: dict, repo: str = REPO) -> dict:
  workdir = tempfile.mkdtemp(prefix="startup_")
  cmd = [sys.executable, "-m", "structvit_jax.main", f"--config={config}",
         f"--workdir={workdir}", "--config.num_train_steps=2", "--config.log_every_steps=1",
         *cache_flag, *extra]
  t0 = time.perf_counter()
  p = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  out, wall, cpu, breakdown = [], None, None, ""
  try:
    for line in p.stdout:
      out.append(line)
      if m := BREAKDOWN.search(line):
        breakdown = m.group(1).strip()
      if STEP1.search(line):
        wall, cpu = time.perf_counter() - t0, _cpu_seconds(p.pid)
        break
      if time.perf_counter() - t0 > timeout:
        break
  finally:
    if p.poll() is None:
      p.send_signal(signal.SIGKILL)
    p.wait()
    shutil.rmtree(workdir, ignore_errors=True)
  if wall is None:
    raise RuntimeError(f"no step-1 line from {' '.join(cmd)}:\n{''.join(out[-40:])}")
  return dict(wall=wall, cpu=cpu, breakdown=breakdown)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--runs", type=int, default=2, help="run 1: empty cache; 2..: restarts")
  ap.add_argument("--cache_dir", default="",
                  help="cache directory (default: a new temporary one); 'off': the cache "
                       "off; 'none': no cache flag (a trainer without the field)")
  ap.add_argument("--timeout", type=float, default=1800.0)
  ap.add_argument("--repo", default=REPO, help="the checkout whose trainer runs")
  ap.add_argument("extra", nargs="*", help="more trainer flags, after --")
  a = ap.parse_args(argv)
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [a.repo, env.get("PYTHONPATH", "")]))
  cache = a.cache_dir or tempfile.mkdtemp(prefix="startup_cache_")
  flag = {"none": [], "off": ["--config.compilation_cache_dir="]}.get(
      cache, [f"--config.compilation_cache_dir={cache}"])
  print(f"{a.repo}: {a.config} {' '.join(a.extra)}; cache: {cache}")
  print("| run | wall s | CPU s | cache files | trainer's breakdown |")
  print("|---|---|---|---|---|")
  for i in range(a.runs):
    r = run_once(a.config, a.extra, flag, a.timeout, env, a.repo)
    name = "first" if i == 0 else f"restart {i}"
    files = _count(cache) if cache not in ("none", "off") else 0
    print(f"| {name} | {r['wall']:.1f} | {r['cpu']:.1f} | {files} | {r['breakdown']} |",
          flush=True)
  if not a.cache_dir:
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
  main()
