"""Table 1 at laptop scale: SA vs ConvSA vs StructSA on motion-only clips, on a CPU.

  python benchmarks/table1.py            # the default run: video DeiT, Table 1a/b/c, 2 inits
  python benchmarks/table1.py --backbone=structvit_tiny   # the first edition's UniFormer table
  python benchmarks/table1.py --quick    # smoke run (seconds of training; CI)

Trains one small backbone once per variant, init and seed with the same budget (steps,
batch, lr schedule):
  - `deit` (default): the paper's Table 1 backbone, a pure-attention video DeiT (frame-wise
    patches, temporal_patch_size 1: no convolution sees motion before attention; every SA
    layer replaced by the variant's), on an 8 x 4 x 4 token grid for 8x32x32 clips;
  - `structvit_tiny`: UniFormer with 1 block a stage, the SA blocks of stages 3-4 running
    StructSA (the first edition; its 3-D conv stages see motion before attention does);
on
  - synthetic_motion (structvit_jax/data/motion.py): random-dot kinematograms; every single
    frame is statistically the same whatever the class, which is only the direction of the
    coherent motion (8 classes);
  - synthetic_video (structvit_jax/data/synthetic.py): a moving shape, visible in every frame;
and prints and writes (--out: table1.md and table1.json) variant, init, params, GFLOPs (MACs
per clip, docs/flops.md), eval top-1 mean +- std over seeds, how far the trained U^K / U^V
moved from their init, and wall time per run. Each seed changes the initialisation and the
order of the training examples; the data are the same.
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

# name -> (D, stride, aggregation, M); D = 0 is SA, D = 1 with context aggregation is ConvSA.
VARIANTS = {
    "SA": (0, 1, "context", 3),
    "ConvSA": (1, 1, "context", 3),
    "StructSA D=2": (2, 1, "context", 3),
    "StructSA D=4": (4, 1, "context", 3),
    "StructSA D=8": (8, 1, "context", 3),
    "StructSA D=4 M=1": (4, 1, "context", 1),
    "StructSA D=4 M=5": (4, 1, "context", 5),
    "StructSA D=4 stride 2": (4, 2, "context", 3),
    "StructSA D=4 element": (4, 1, "element", 3),
}
# The paper's sub-tables on the DeiT backbone: 1a D, 1b M at D = 4, 1c aggregation at D = 4.
TABLES = {
    "1a": ("SA", "ConvSA", "StructSA D=2", "StructSA D=4", "StructSA D=8"),
    "1b": ("StructSA D=4 M=1", "StructSA D=4", "StructSA D=4 M=5"),
    "1c": ("StructSA D=4 element", "StructSA D=4"),
}
BACKBONES = ("deit", "structvit_tiny")
# Per backbone: the default variants, datasets, budget and task. The deit settings were
# chosen with SA alone, before any StructSA run (README "Table 1 at laptop scale"): at the
# first edition's (300 steps, lr 3e-3, coherence 0.5, 2 px a frame) SA stays at chance.
DEFAULTS = {
    "deit": dict(variants=tuple(dict.fromkeys(v for t in TABLES.values() for v in t)),
                 datasets=("synthetic_motion",), steps=600, warmup_steps=60, lr=1e-3,
                 coherence=1.0, speed=8.0, xla_opt=True),
    "structvit_tiny": dict(variants=("SA", "ConvSA", "StructSA D=2", "StructSA D=4"),
                           datasets=("synthetic_motion", "synthetic_video"), steps=300,
                           warmup_steps=30, lr=3e-3, coherence=0.5, speed=2.0, xla_opt=False),
}
DEFAULT_VARIANTS = DEFAULTS["structvit_tiny"]["variants"]
DATASETS = ("synthetic_motion", "synthetic_video")
# The video DeiT of the deit backbone (models/deit.py): frame-wise 8x8 patches, so 8x32x32
# clips give an 8 x 4 x 4 token grid on which a 3x3x3 window is local. How the settings were
# chosen (with SA alone, before any StructSA run): README "Table 1 at laptop scale".
DEIT = dict(patch_size=8, temporal_patch_size=1, embed_dim=64, depth=2, num_heads=2,
            mlp_ratio=4.0, qkv_init_std=0.08)
# Coherence of the motion-only data for structvit_tiny; how it was chosen: README "Table 1 at
# laptop scale".
COHERENCE = DEFAULTS["structvit_tiny"]["coherence"]


def structsa_kwargs(d: int, stride: int, aggregation: str, kernel_size: int = 3,
                    init: str | None = None) -> dict:
  """The model fields of one StructSA variant (models/structsa.py: StructSAConfig)."""
  s = dict(d=d, stride=stride, aggregation=aggregation, kernel_size=kernel_size)
  return dict(structsa=s if init is None else dict(s, init=init))


def make_config(dataset: str, variant: str, seed: int, args: argparse.Namespace,
                init: str | None = None):
  """A base-schema config (configs/base.py) for one run of the table."""
  from structvit_jax import config_utils
  base = config_utils.import_sibling(os.path.join(REPO, "configs", "base.py"), "base")
  c = base.get_base_config()
  c.seed = seed
  if args.backbone == "deit":
    c.model.name = "deit_tiny"
    for k, v in DEIT.items():
      c.model.kwargs[k] = v
  else:
    c.model.name = "structvit_tiny"
  c.model.kwargs.num_classes = 8
  c.model.kwargs.drop_path_rate = 0.0
  for k, v in structsa_kwargs(*VARIANTS[variant], init=init).items():
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
    if args.backbone == "deit":  # the dots' own statistics (chosen with SA: README)
      c.data.mean, c.data.std = (0.08,) * 3, (0.27,) * 3
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
  return params, flops.count_model_macs(model, shape, variables=variables)["total"] / 1e9


def run_one(config, workdir: str) -> tuple[float, float, float, dict]:
  """Trains and evaluates one config in a fresh workdir: (eval top-1, wall seconds, CPU
  seconds of this process (on a shared machine the CPU time says what the run costs),
  kernel_movement of the trained model)."""
  from structvit_jax import train
  start, cpu = time.perf_counter(), time.process_time()
  state, results = train.train_and_evaluate(config, workdir)
  if "eval/top1" not in results:  # e.g. SIGTERM: the trainer saved and stopped early
    raise RuntimeError(f"the run in {workdir} stopped before its final evaluation "
                       f"(interrupted?); its results: {sorted(results)}")
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu
  return float(results["eval/top1"]), wall, cpu, kernel_movement(config, state.params)


def _off_centre_share(u) -> float:
  """Share of a [*window, D, C] kernel's energy outside the window's centre tap."""
  import numpy as np
  u = np.asarray(u, np.float64)
  centre = u[tuple(k // 2 for k in u.shape[:-2])]
  return float(1.0 - (centre ** 2).sum() / max((u ** 2).sum(), 1e-30))


def kernel_movement(config, params) -> dict:
  """How far training moved U^K and U^V (averages over the layers): their off-centre energy
  share at init and after training (a centre-tap kernel is SA's identity: share 0; a
  uniform random 3x3x3 kernel: ~26/27), and |U - U0| / |U0|. U0 is the trainer's init,
  recomputed from the seed (train_state.init_state's key split). Empty for SA."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import traverse_util
  from structvit_jax import train_state
  flat = lambda p: {k: np.asarray(v) for k, v in traverse_util.flatten_dict(p).items()  # noqa
                    if k[-1] in ("u_k", "u_v")}
  final = flat(params)
  if not final:
    return {}
  shape = (config.data.num_frames, config.data.image_size, config.data.image_size, 3)
  params_rng, dropout_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  model = train_state.build_model(config, 8)
  init = flat(jax.jit(lambda: model.init({"params": params_rng, "dropout": dropout_rng},
                                         jnp.zeros((1, *shape)), train=False))()["params"])
  out = {}
  for leaf in ("u_k", "u_v"):
    keys = [k for k in final if k[-1] == leaf]
    out[f"{leaf}_offcentre_init"] = float(np.mean([_off_centre_share(init[k]) for k in keys]))
    out[f"{leaf}_offcentre"] = float(np.mean([_off_centre_share(final[k]) for k in keys]))
    out[f"{leaf}_moved"] = float(np.mean([np.linalg.norm(final[k] - init[k]) /
                                          max(np.linalg.norm(init[k]), 1e-30) for k in keys]))
  return out


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


def run_task(dataset: str, variant: str, init: str, seed: int, args: argparse.Namespace,
             workdir: str) -> dict:
  """One run of the table in a fresh workdir (removed afterwards unless --keep_workdirs)."""
  config = make_config(dataset, variant, seed, args, init=init or None)
  shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resume
  os.makedirs(workdir)
  try:
    top1, wall, cpu, moved = run_one(config, workdir)
  finally:
    if not args.keep_workdirs:
      shutil.rmtree(workdir, ignore_errors=True)
  d, stride, aggregation, m = VARIANTS[variant]
  return dict(dataset=dataset, variant=variant, init=init, seed=seed, d=d, stride=stride,
              aggregation=aggregation, m=m, top1=top1, wall_s=wall, cpu_s=cpu, **moved)


MOVEMENT = ("u_k_offcentre_init", "u_k_offcentre", "u_k_moved", "u_v_offcentre_init",
            "u_v_offcentre", "u_v_moved")


def summarize(runs: list[dict]) -> list[dict]:
  """Per-seed runs -> one row per (dataset, variant, init), in run order."""
  rows: dict[tuple[str, str, str], dict] = {}
  for r in runs:
    row = rows.setdefault((r["dataset"], r["variant"], r.get("init", "")), dict(
        dataset=r["dataset"], variant=r["variant"], init=r.get("init", ""), d=r["d"],
        stride=r["stride"], aggregation=r["aggregation"], m=r.get("m", 3),
        params=r["params"], gflops=r["gflops"], top1=[], wall_s=[], cpu_s=[],
        **{k: [] for k in MOVEMENT}))
    row["top1"].append(r["top1"])
    row["wall_s"].append(r["wall_s"])
    row["cpu_s"].append(r.get("cpu_s", 0.0))
    for k in MOVEMENT:
      if k in r:
        row[k].append(r[k])
  out = []
  order = lambda k, names: names.index(k) if k in names else len(names)  # noqa: E731
  for _, row in sorted(rows.items(), key=lambda kv: (order(kv[0][0], DATASETS),
                                                     order(kv[0][1], list(VARIANTS)),
                                                     kv[0][2])):
    t = row["top1"]
    out.append(dict(row, top1_mean=statistics.fmean(t),
                    top1_std=statistics.stdev(t) if len(t) > 1 else 0.0,
                    wall_s_mean=statistics.fmean(row["wall_s"]),
                    cpu_s_mean=statistics.fmean(row["cpu_s"]),
                    **{f"{k}_mean": statistics.fmean(row[k]) for k in MOVEMENT if row[k]}))
  return out


def versus_sa(row: dict, sa: dict | None) -> tuple[float, float] | None:
  """(difference of mean top-1 to SA's, twice the standard error of that difference)."""
  if sa is None or row is sa or len(row["top1"]) < 2 or len(sa["top1"]) < 2:
    return None
  se = (row["top1_std"] ** 2 / len(row["top1"]) + sa["top1_std"] ** 2 / len(sa["top1"])) ** 0.5
  return row["top1_mean"] - sa["top1_mean"], 2 * se


def _row_line(r: dict, sa: dict | None) -> str:
  std = "-" if len(r["top1"]) < 2 else format(r["top1_std"], ".3f")
  vs = versus_sa(r, sa)
  vs = "" if vs is None else f"{vs[0]:+.3f} ({vs[1]:.3f})" + (" **>**" if vs[0] > vs[1] else "")
  mv = lambda k: f"{r[k + '_mean']:.2f}" if k + "_mean" in r else "-"  # noqa: E731
  kernels = (f"{mv('u_k_offcentre_init')} → {mv('u_k_offcentre')} / {mv('u_k_moved')} | "
             f"{mv('u_v_offcentre_init')} → {mv('u_v_offcentre')} / {mv('u_v_moved')}")
  return (f"| {r['variant']} | {r['init'] or '-'} | {r['d']} | {r['m']} | {r['aggregation']} | "
          f"{r['params'] / 1e3:.1f}k | {r['gflops']:.4f} | {r['top1_mean']:.3f} ± {std} | "
          f"{len(r['top1'])} | {vs} | {kernels} | {r['wall_s_mean']:.0f} | "
          f"{r['cpu_s_mean']:.0f} |")


def _sections(rows: list[dict], header: dict) -> list[tuple[str, list[dict]]]:
  """(title, rows) of each table: 1a per init, 1b, 1c for the deit backbone; else all rows."""
  if header.get("backbone", "structvit_tiny") != "deit":
    return [("", rows)]
  out, used = [], set()
  inits = header.get("inits") or [""]
  for name, variants in TABLES.items():
    for init in inits:
      sel = [r for v in variants for r in rows
             if r["variant"] == v and (r["init"] == init or r["d"] == 0)]
      if len(sel) >= 2 and any(r["d"] > 0 for r in sel):
        out.append((f"Table {name}" + (f", init {init}" if init else ""), sel))
        used.update(id(r) for r in sel)
  rest = [r for r in rows if id(r) not in used]
  return out + ([("other", rest)] if rest else [])


def markdown(rows: list[dict], header: dict) -> str:
  lines = []
  for dataset in dict.fromkeys(r["dataset"] for r in rows):
    drows = [r for r in rows if r["dataset"] == dataset]
    sa = next((r for r in drows if r["d"] == 0), None)
    for title, sel in _sections(drows, header):
      lines += [f"**{dataset}**" + (f" (coherence {header['coherence']})"
                                    if dataset == "synthetic_motion" else "") +
                (f", {title}" if title else ""), "",
                "| variant | init | D | M | aggregation | params | GFLOPs | top-1 (mean ± std) "
                "| seeds | vs SA (2 SE) | U^K off-centre init → trained / moved "
                "| U^V off-centre init → trained / moved | wall / run (s) | CPU / run (s) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
      lines += [_row_line(r, sa) for r in sel] + [""]
  lines.append(f"Chance 0.125. Backbone {header.get('model', 'structvit_tiny')}; "
               f"{header['steps']} steps of batch {header['batch']} at lr {header['lr']} "
               f"({header['frames']}x{header['image_size']}x{header['image_size']} clips), "
               f"eval on {header['eval_examples']} held-out clips; total wall "
               f"{header['total_wall_s'] / 60:.1f} min on {header['machine']} "
               f"({header['runs_done']} runs, {header.get('jobs', 1)} at a time, "
               f"{sum(sum(r['cpu_s']) for r in rows) / 60:.1f} CPU min; CPU = the process's "
               f"user + system time; the first run of a variant includes its compiles). "
               f"vs SA: difference of mean top-1 to SA's and twice its standard error; **>** "
               f"where the difference is larger. Off-centre: share of the kernel's energy "
               f"outside the window's centre tap; moved: |U - U0| / |U0| (layer means).")
  return "\n".join(lines) + "\n"


def default_out(backbone: str) -> str:
  """benchmarks/results (the first edition's UniFormer table) or results/table1_deit."""
  results = os.path.join(REPO, "benchmarks", "results")
  return results if backbone == "structvit_tiny" else os.path.join(results, "table1_deit")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 seed, 2 variants")
  p.add_argument("--backbone", default="deit", choices=BACKBONES,
                 help="deit: the pure-attention video DeiT (Table 1's backbone); "
                 "structvit_tiny: the first edition's UniFormer")
  p.add_argument("--variants", default=None,
                 help=f"comma-separated (default: the backbone's), from: {', '.join(VARIANTS)}")
  p.add_argument("--inits", default=None,
                 help="U^K / U^V inits (StructSAConfig.init), comma-separated; the first one "
                 "runs every variant, the others Table 1a only (default: deit 'torch,centre', "
                 "structvit_tiny 'centre', the first edition's)")
  p.add_argument("--datasets", default=None,
                 help=f"comma-separated (default: the backbone's), from: {', '.join(DATASETS)}")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--first_seed", type=int, default=0, help="seeds first_seed.. (to split the "
                 "run over processes or machines; --merge joins the parts)")
  p.add_argument("--merge", default=None, help="comma-separated table1.json files of parts of "
                 "one run (same settings): write their joint table to --out, train nothing")
  p.add_argument("--steps", type=int, default=None, help="default: the backbone's (600 | 300)")
  p.add_argument("--warmup_steps", type=int, default=None)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--lr", type=float, default=None, help="default: the backbone's (1e-3 | 3e-3)")
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--frames", type=int, default=8)
  p.add_argument("--train_examples", type=int, default=4800)
  p.add_argument("--eval_examples", type=int, default=800)
  p.add_argument("--coherence", type=float, default=None,
                 help="synthetic_motion's; default: the backbone's (1.0 | 0.5)")
  p.add_argument("--speed", type=float, default=None,
                 help="synthetic_motion's, pixels a frame; default: the backbone's (8 = one "
                 "deit token | 2)")
  p.add_argument("--dot_density", type=float, default=0.08)
  p.add_argument("--model_kwargs", type=json.loads, default=None,
                 help='extra model fields for every variant, JSON, e.g. \'{"structsa": {"kernel_size": 5}}\'')
  p.add_argument("--xla_opt", default=None, action=argparse.BooleanOptionalAction,
                 help="full XLA optimisation (default: on for deit, whose 600 steps gain more "
                 "than the compiles cost; off for structvit_tiny)")
  p.add_argument("--jobs", type=int, default=None,
                 help="runs trained side by side, each in its own process (default: one per "
                 "CPU core, at most 8; 1 with --quick). A run of this small model keeps about "
                 "one core busy, so on 2 cores 2 jobs nearly halve the wall time")
  p.add_argument("--verbose", action="store_true", help="the trainer's log lines too")
  p.add_argument("--out", default=None, help="directory for table1.md / table1.json "
                 "(default: benchmarks/results/table1_deit, benchmarks/results for "
                 "structvit_tiny, or a temporary one with --quick)")
  p.add_argument("--keep_workdirs", default=None,
                 help="keep each run's workdir (checkpoint, config.json) under this directory")
  args = p.parse_args(argv)
  defaults = DEFAULTS[args.backbone]
  args.variants = args.variants or ",".join(defaults["variants"])
  args.datasets = args.datasets or ",".join(defaults["datasets"])
  for k in ("steps", "warmup_steps", "lr", "coherence", "speed", "xla_opt"):
    if getattr(args, k) is None:
      setattr(args, k, defaults[k])
  if args.inits is None:
    # structvit_tiny: the first edition ran the centre tap, then the only init.
    args.inits = "torch,centre" if args.backbone == "deit" else "centre"
  from structvit_jax.models.structsa import INITS
  bad_inits = [i for i in args.inits.split(",") if i and i not in INITS]
  if bad_inits:
    p.error(f"unknown init(s) {bad_inits}; valid: {', '.join(INITS)}")
  unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
  if unknown:
    p.error(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
  bad = [d for d in args.datasets.split(",") if d not in DATASETS]
  if bad:
    p.error(f"unknown dataset(s) {bad}; valid: {', '.join(DATASETS)}")
  if args.quick:
    args.variants, args.seeds, args.steps, args.warmup_steps = "SA,StructSA D=2", 1, 2, 1
    args.inits = args.inits.split(",")[0]
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
    os.makedirs(args.out or default_out(args.backbone), exist_ok=True)
    return merge(args.merge.split(","), args.out or default_out(args.backbone))
  setup_process(args)
  import jax
  out = args.out or (os.path.join(tempfile.gettempdir(), "table1_quick") if args.quick
                     else default_out(args.backbone))
  os.makedirs(out, exist_ok=True)
  header = dict(command="python benchmarks/table1.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv),
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                machine=f"{os.cpu_count()}-core {platform.machine()} "
                        f"{jax.devices()[0].platform.upper()}",
                backbone=args.backbone,
                model="deit_tiny " + json.dumps(DEIT) if args.backbone == "deit"
                else "structvit_tiny", inits=args.inits.split(","), coherence=args.coherence, speed=args.speed,
                dot_density=args.dot_density, steps=args.steps, batch=args.batch,
                lr=args.lr, warmup_steps=args.warmup_steps, image_size=args.image_size,
                frames=args.frames, train_examples=args.train_examples,
                eval_examples=args.eval_examples, model_kwargs=args.model_kwargs or {},
                xla_opt=args.xla_opt)
  header["jobs"] = args.jobs
  # Seed-major: a run cut short still has every variant of the first seeds, and the runs side
  # by side are different variants.
  tasks = [(dataset, variant, init, seed) for dataset in args.datasets.split(",")
           for seed in range(args.first_seed, args.first_seed + args.seeds)
           for i, init in enumerate(args.inits.split(","))
           for variant in args.variants.split(",")
           if (i == 0 or variant in TABLES["1a"]) and (i == 0 or VARIANTS[variant][0] > 0)]
  # SA has no U^K / U^V: its runs carry no init.
  tasks = [(ds, v, "" if VARIANTS[v][0] == 0 else init, seed) for ds, v, init, seed in tasks]
  if args.backbone == "deit":  # Table 1a (both inits) for every seed first: the core rows
    tasks.sort(key=lambda t: (t[1] not in TABLES["1a"], t[0], t[3]))  # stable otherwise
  costs = {v: model_cost(make_config(tasks[0][0], v, 0, args))
           for v in dict.fromkeys(t[1] for t in tasks)}
  runs, start, result = [], time.perf_counter(), None

  def workdir_of(dataset: str, variant: str, init: str, seed: int) -> str:
    name = f"{dataset}/{variant.replace(' ', '_')}{'_' + init if init else ''}/seed{seed}"
    return (os.path.join(args.keep_workdirs, name) if args.keep_workdirs
            else tempfile.mkdtemp(prefix="table1_"))

  def done(run: dict) -> dict:
    run.update(params=costs[run["variant"]][0], gflops=costs[run["variant"]][1])
    runs.append(run)
    runs.sort(key=lambda r: tasks.index((r["dataset"], r["variant"], r["init"], r["seed"])))
    print(f"{run['dataset']}/{run['variant'].replace(' ', '_')}/{run['init'] or '-'}/"
          f"seed{run['seed']}: top-1 "
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
  keys = ("backbone", "steps", "batch", "lr", "warmup_steps", "image_size", "frames", "train_examples",
          "eval_examples", "model_kwargs", "xla_opt")
  for p in parts[1:]:
    diff = [k for k in keys if p["header"].get(k) != parts[0]["header"].get(k)]
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
