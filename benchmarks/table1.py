"""Table 1 at laptop scale: SA vs ConvSA vs StructSA on motion-only clips, on a CPU.

  python benchmarks/table1.py            # the default run (README "Table 1 at laptop scale")
  python benchmarks/table1.py --quick    # smoke run (seconds of training; CI)

Trains the same small video backbone (structvit_tiny: UniFormer with 1 block a stage, the
SA blocks of stages 3-4 running StructSA) once per variant and seed with the same budget
(steps, batch, lr schedule), on
  - synthetic_motion (structvit_jax/data/motion.py): random-dot kinematograms; every single
    frame is statistically the same whatever the class, which is only the direction of the
    coherent motion (8 classes);
  - synthetic_video (structvit_jax/data/synthetic.py): a moving shape, visible in every frame;
and prints and writes (--out: table1.md and table1.json) variant, params, GFLOPs (MACs per
clip, docs/flops.md), eval top-1 mean +- std over seeds and wall time per run. Each seed
changes the initialisation and the order of the training examples; the data are the same.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# name -> (D, stride, aggregation); D = 0 is SA, D = 1 with context aggregation is ConvSA.
VARIANTS = {
    "SA": (0, 1, "context"),
    "ConvSA": (1, 1, "context"),
    "StructSA D=2": (2, 1, "context"),
    "StructSA D=4": (4, 1, "context"),
    "StructSA D=4 stride 2": (4, 2, "context"),
    "StructSA D=4 element": (4, 1, "element"),
}
# Stride 2 and element aggregation are optional (--variants): the default fits the budget.
DEFAULT_VARIANTS = ("SA", "ConvSA", "StructSA D=2", "StructSA D=4")
DATASETS = ("synthetic_motion", "synthetic_video")
# Coherence of the motion-only data; how it was chosen: README "Table 1 at laptop scale".
COHERENCE = 0.5


def structsa_kwargs(d: int, stride: int, aggregation: str) -> dict:
  """The model fields of one StructSA variant (models/structsa.py: StructSAConfig)."""
  return dict(structsa=dict(d=d, stride=stride, aggregation=aggregation))


def make_config(dataset: str, variant: str, seed: int, args: argparse.Namespace):
  """A base-schema config (configs/base.py) for one run of the table."""
  from structvit_jax import config_utils
  base = config_utils.import_sibling(os.path.join(REPO, "configs", "base.py"), "base")
  c = base.get_base_config()
  c.seed = seed
  c.model.name = "structvit_tiny"
  c.model.kwargs.num_classes = 8
  c.model.kwargs.drop_path_rate = 0.0
  for k, v in structsa_kwargs(*VARIANTS[variant]).items():
    c.model.kwargs[k] = v
  for k, v in (args.model_kwargs or {}).items():  # ablations of the ablation (--model_kwargs)
    if k == "structsa":  # e.g. {"structsa": {"init_noise": 0.3}}: on top of the variant's
      c.model.kwargs.structsa.update(v)
    else:
      c.model.kwargs[k] = v
  c.data.name = dataset
  c.data.image_size = args.image_size
  c.data.num_frames = args.frames
  c.data.train_examples = args.train_examples
  c.data.eval_examples = args.eval_examples
  c.data.generator_seed = 0
  c.data.random_flip = False  # a flip would swap directions
  if dataset == "synthetic_motion":
    c.data.coherence = args.coherence
    c.data.speed = args.speed
    c.data.dot_density = args.dot_density
  c.batch_size = args.batch
  c.eval_batch_size = args.batch
  c.num_train_steps = args.steps
  c.num_epochs = 1.0  # num_train_steps rules; epochs only size the warm-up below
  c.warmup_epochs = args.warmup_steps * args.batch / args.train_examples
  c.lr = args.lr
  c.lr_base_batch_size = args.batch
  c.min_lr = 1e-5
  c.weight_decay = 0.05
  c.label_smoothing = 0.0
  c.mixup_alpha = 0.0
  c.cutmix_alpha = 0.0
  c.eval_every_epochs = 1e6  # once, at the end
  c.checkpoint_every_steps = 10**9
  c.keep_checkpoints = 1
  c.log_every_steps = max(1, args.steps // 4)
  return c


def model_cost(config) -> tuple[int, float]:
  """(parameters, GFLOPs = GMACs per clip) of the config's model."""
  import jax
  import jax.numpy as jnp
  from structvit_jax import flops
  from structvit_jax.models import get_model
  model = get_model(config.model.name, **config.model.kwargs.to_dict())
  shape = (config.data.num_frames, config.data.image_size, config.data.image_size, 3)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))
  params = flops.count_params(variables["params"])
  return params, flops.count_model_macs(model, shape)["total"] / 1e9


def run_one(config, workdir: str) -> tuple[float, float, float]:
  """Trains and evaluates one config in a fresh workdir: (eval top-1, wall seconds, CPU
  seconds of this process; on a shared machine the CPU time says what the run costs)."""
  from structvit_jax import train
  start, cpu = time.perf_counter(), time.process_time()
  _, results = train.train_and_evaluate(config, workdir)
  if "eval/top1" not in results:  # e.g. SIGTERM: the trainer saved and stopped early
    raise RuntimeError(f"the run in {workdir} stopped before its final evaluation "
                       f"(interrupted?); its results: {sorted(results)}")
  return (float(results["eval/top1"]), time.perf_counter() - start,
          time.process_time() - cpu)


def setup_process(args: argparse.Namespace) -> None:
  """Logging and JAX settings of a process that trains runs (the main one or a --jobs
  worker)."""
  from absl import logging
  if not args.verbose:
    logging.set_verbosity(logging.WARNING)  # one line a run instead of the trainer's
  import jax
  if not args.xla_opt:
    jax.config.update("jax_disable_most_optimizations", True)
  if not jax.config.jax_compilation_cache_dir:
    # Seeds (and the two datasets: same shapes, same class count) share each variant's
    # compiled steps: only the first run of a variant pays the compile.
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(tempfile.gettempdir(), "table1_jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def run_task(dataset: str, variant: str, seed: int, args: argparse.Namespace,
             workdir: str) -> dict:
  """One run of the table in a fresh workdir (removed afterwards unless --keep_workdirs)."""
  config = make_config(dataset, variant, seed, args)
  shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resume
  os.makedirs(workdir)
  try:
    top1, wall, cpu = run_one(config, workdir)
  finally:
    if not args.keep_workdirs:
      shutil.rmtree(workdir, ignore_errors=True)
  d, stride, aggregation = VARIANTS[variant]
  return dict(dataset=dataset, variant=variant, seed=seed, d=d, stride=stride,
              aggregation=aggregation, top1=top1, wall_s=wall, cpu_s=cpu)


def summarize(runs: list[dict]) -> list[dict]:
  """Per-seed runs -> one row per (dataset, variant), in run order."""
  rows: dict[tuple[str, str], dict] = {}
  for r in runs:
    row = rows.setdefault((r["dataset"], r["variant"]), dict(
        dataset=r["dataset"], variant=r["variant"], d=r["d"], stride=r["stride"],
        aggregation=r["aggregation"], params=r["params"], gflops=r["gflops"], top1=[],
        wall_s=[], cpu_s=[]))
    row["top1"].append(r["top1"])
    row["wall_s"].append(r["wall_s"])
    row["cpu_s"].append(r.get("cpu_s", 0.0))
  out = []
  order = lambda k, names: names.index(k) if k in names else len(names)  # noqa: E731
  for _, row in sorted(rows.items(), key=lambda kv: (order(kv[0][0], DATASETS),
                                                     order(kv[0][1], list(VARIANTS)))):
    t = row["top1"]
    out.append(dict(row, top1_mean=statistics.fmean(t),
                    top1_std=statistics.stdev(t) if len(t) > 1 else 0.0,
                    wall_s_mean=statistics.fmean(row["wall_s"]),
                    cpu_s_mean=statistics.fmean(row["cpu_s"])))
  return out


def markdown(rows: list[dict], header: dict) -> str:
  lines = []
  for dataset in dict.fromkeys(r["dataset"] for r in rows):
    lines += [f"**{dataset}**" + (f" (coherence {header['coherence']})"
                                  if dataset == "synthetic_motion" else ""), "",
              "| variant | D | stride | aggregation | params | GFLOPs | top-1 (mean ± std) "
              "| seeds | wall / run (s) | CPU / run (s) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["dataset"] == dataset):
      lines.append(f"| {r['variant']} | {r['d']} | {r['stride']} | {r['aggregation']} | "
                   f"{r['params'] / 1e3:.1f}k | {r['gflops']:.4f} | "
                   f"{r['top1_mean']:.3f} ± "
                   f"{'-' if len(r['top1']) < 2 else format(r['top1_std'], '.3f')} | "
                   f"{len(r['top1'])} | "
                   f"{r['wall_s_mean']:.0f} | {r['cpu_s_mean']:.0f} |")
    lines.append("")
  lines.append(f"Chance 0.125. {header['steps']} steps of batch {header['batch']} "
               f"({header['frames']}x{header['image_size']}x{header['image_size']} clips), "
               f"eval on {header['eval_examples']} held-out clips; total wall "
               f"{header['total_wall_s'] / 60:.1f} min on {header['machine']} "
               f"({header['runs_done']} runs, {header.get('jobs', 1)} at a time, {sum(sum(r['cpu_s']) for r in rows) / 60:.1f} "
               f"CPU min; CPU = the process's user + system time; the first run of a variant "
               f"includes its compiles).")
  return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 seed, 2 variants")
  p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                 help=f"comma-separated, from: {', '.join(VARIANTS)}")
  p.add_argument("--datasets", default=",".join(DATASETS))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--first_seed", type=int, default=0, help="seeds first_seed.. (to split the "
                 "run over processes or machines; --merge joins the parts)")
  p.add_argument("--merge", default=None, help="comma-separated table1.json files of parts of "
                 "one run (same settings): write their joint table to --out, train nothing")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--warmup_steps", type=int, default=30)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--frames", type=int, default=8)
  p.add_argument("--train_examples", type=int, default=4800)
  p.add_argument("--eval_examples", type=int, default=800)
  p.add_argument("--coherence", type=float, default=COHERENCE)
  p.add_argument("--speed", type=float, default=2.0)
  p.add_argument("--dot_density", type=float, default=0.08)
  p.add_argument("--model_kwargs", type=json.loads, default=None,
                 help='extra model fields for every variant, JSON, e.g. \'{"structsa": {"kernel_size": 5}}\'')
  p.add_argument("--xla_opt", action="store_true",
                 help="full XLA optimisation (default off: on a CPU the compiles would cost "
                 "more than a few hundred steps gain)")
  p.add_argument("--jobs", type=int, default=None,
                 help="runs trained side by side, each in its own process (default: one per "
                 "CPU core, at most 8; 1 with --quick). A run of this small model keeps about "
                 "one core busy, so on 2 cores 2 jobs nearly halve the wall time")
  p.add_argument("--verbose", action="store_true", help="the trainer's log lines too")
  p.add_argument("--out", default=None, help="directory for table1.md / table1.json "
                 "(default: benchmarks/results, or a temporary one with --quick)")
  p.add_argument("--keep_workdirs", default=None,
                 help="keep each run's workdir (checkpoint, config.json) under this directory")
  args = p.parse_args(argv)
  unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
  if unknown:
    p.error(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
  bad = [d for d in args.datasets.split(",") if d not in DATASETS]
  if bad:
    p.error(f"unknown dataset(s) {bad}; valid: {', '.join(DATASETS)}")
  if args.quick:
    args.variants, args.seeds, args.steps, args.warmup_steps = "SA,StructSA D=2", 1, 2, 1
    args.image_size, args.frames, args.train_examples, args.eval_examples = 32, 4, 32, 16
    args.batch = 8
  if args.jobs is None:
    args.jobs = 1 if args.quick else max(1, min(8, os.cpu_count() or 1))
  if args.jobs < 1:
    p.error(f"--jobs={args.jobs}: must be at least 1")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.merge:
    os.makedirs(args.out or os.path.join(REPO, "benchmarks", "results"), exist_ok=True)
    return merge(args.merge.split(","), args.out or os.path.join(REPO, "benchmarks", "results"))
  setup_process(args)
  import jax
  out = args.out or (os.path.join(tempfile.gettempdir(), "table1_quick") if args.quick
                     else os.path.join(REPO, "benchmarks", "results"))
  os.makedirs(out, exist_ok=True)
  header = dict(command="python benchmarks/table1.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv),
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                machine=f"{os.cpu_count()}-core {platform.machine()} "
                        f"{jax.devices()[0].platform.upper()}",
                model="structvit_tiny", coherence=args.coherence, speed=args.speed,
                dot_density=args.dot_density, steps=args.steps, batch=args.batch,
                lr=args.lr, warmup_steps=args.warmup_steps, image_size=args.image_size,
                frames=args.frames, train_examples=args.train_examples,
                eval_examples=args.eval_examples, model_kwargs=args.model_kwargs or {},
                xla_opt=args.xla_opt)
  header["jobs"] = args.jobs
  # Seed-major: a run cut short still has every variant of the first seeds, and the runs side
  # by side are different variants.
  tasks = [(dataset, variant, seed) for dataset in args.datasets.split(",")
           for seed in range(args.first_seed, args.first_seed + args.seeds)
           for variant in args.variants.split(",")]
  costs = {v: model_cost(make_config(tasks[0][0], v, 0, args))
           for v in dict.fromkeys(t[1] for t in tasks)}
  runs, start, result = [], time.perf_counter(), None

  def workdir_of(dataset: str, variant: str, seed: int) -> str:
    name = f"{dataset}/{variant.replace(' ', '_')}/seed{seed}"
    return (os.path.join(args.keep_workdirs, name) if args.keep_workdirs
            else tempfile.mkdtemp(prefix="table1_"))

  def done(run: dict) -> dict:
    run.update(params=costs[run["variant"]][0], gflops=costs[run["variant"]][1])
    runs.append(run)
    runs.sort(key=lambda r: tasks.index((r["dataset"], r["variant"], r["seed"])))
    print(f"{run['dataset']}/{run['variant'].replace(' ', '_')}/seed{run['seed']}: top-1 "
          f"{run['top1']:.3f} in {run['wall_s']:.0f} s ({run['cpu_s']:.0f} CPU s)", flush=True)
    return write(out, header, runs, time.perf_counter() - start)  # partial results too

  if args.jobs == 1:
    for task in tasks:
      result = done(run_task(*task, args, workdir_of(*task)))
  else:
    import concurrent.futures
    import multiprocessing
    # Worker processes are spawned: a fork of a process whose JAX runtime has started can hang.
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"),
        initializer=setup_process, initargs=(args,)) as pool:
      futures = [pool.submit(run_task, *task, args, workdir_of(*task)) for task in tasks]
      try:
        for future in concurrent.futures.as_completed(futures):
          result = done(future.result())
      except BaseException:
        for f in futures:
          f.cancel()
        raise
  print("\n" + markdown(result["rows"], result["header"]), flush=True)
  return result


def write(out: str, header: dict, runs: list[dict], total_wall_s: float) -> dict:
  header = dict(header, total_wall_s=total_wall_s, runs_done=len(runs))
  rows = summarize(runs)
  with open(os.path.join(out, "table1.md"), "w") as f:
    f.write(f"<!-- {header['command']} ({header['date']}) -->\n\n{markdown(rows, header)}")
  result = dict(header=header, rows=rows, runs=runs)
  with open(os.path.join(out, "table1.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result



def merge(paths: list[str], out: str) -> dict:
  """Joins the runs of several parts of one table (e.g. one process per dataset)."""
  parts = []
  for path in paths:
    with open(path) as f:
      parts.append(json.load(f))
  keys = ("steps", "batch", "lr", "warmup_steps", "image_size", "frames", "train_examples",
          "eval_examples", "model_kwargs", "xla_opt")
  for p in parts[1:]:
    diff = [k for k in keys if p["header"][k] != parts[0]["header"][k]]
    if diff:
      raise ValueError(f"cannot merge parts with different settings: {diff}")
  runs = [r for p in parts for r in p["runs"]]
  header = dict(parts[0]["header"], command=" + ".join(p["header"]["command"] for p in parts),
                parts=[p["header"] for p in parts],
                coherence=next((p["header"]["coherence"] for p in parts if any(
                    r["dataset"] == "synthetic_motion" for r in p["runs"])),
                               parts[0]["header"]["coherence"]))
  # Parts ran side by side: the run's wall time is the longest part's.
  result = write(out, header, runs, max(p["header"]["total_wall_s"] for p in parts))
  print(markdown(result["rows"], result["header"]), flush=True)
  return result


if __name__ == "__main__":
  main()
