"""Training and inference throughput, step time, compiled memory and MFU of the real steps.

  python benchmarks/throughput.py --model=structvit_s_4_1                     # images 224, bf16
  python benchmarks/throughput.py --model=structvit_s_4_1 --video --frames=16 --batch=8
  python benchmarks/throughput.py --model=structvit_s_4_1,uniformer_s --attention=fused,reference
  python benchmarks/throughput.py --sweep                                      # paper models
  python benchmarks/throughput.py --model=structvit_s_4_1 --data=pipeline     # data wait
  JAX_PLATFORMS=cpu python benchmarks/throughput.py --model=structvit_tiny --image_size=32 \
      --batch=8 --steps=1 --warmup=1 --json                                   # CI smoke run

The step is the trainer's own: `train_state.train_step` (AdamW from `optim.make_optimizer`,
mixup / cutmix / label smoothing of configs/base.py, fp32 params with --dtype compute, state
donated) and `train_state.eval_step` for inference, jitted over a ('data',) mesh of all local
devices with the global --batch split along it by the trainer's own `train_state.make_init`,
`jit_train_step` and `jit_eval_step`.

Timing: compile once (ahead of time, so the memory analysis is of the executable that runs),
run --warmup steps, then --steps steps in --windows windows with one block_until_ready at the
end of each window (no host sync per step); the step time is the median over windows.
Inputs are random uint8 images or clips (normalised in the step, as the trainer's),
pre-placed on the devices, and alternate between two batches.
--data=pipeline then also runs the steps fed by `structvit_jax.data.create_input` on the
built-in synthetic dataset, as the trainer feeds them (uint8 batches normalised in the step,
read ahead onto the devices), and reports how much of the step is spent waiting for data.

A configuration that does not fit (RESOURCE_EXHAUSTED at compile or run time) prints an OOM
row and the sweep goes on. Rows print as they finish (a markdown table, or JSON lines with
--json).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import shlex
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from structvit_jax import config_utils
from structvit_jax import flops as flops_lib
from structvit_jax import optim
from structvit_jax import sharding as shard_lib
from structvit_jax import train_state
from structvit_jax.models import PRESETS, list_models, model_fields

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_MODELS = ("uniformer_s", "structvit_s_4_2", "structvit_s_4_1", "structvit_s_8_1",
                "structvit_b_4_1")
SWEEP_FRAMES = 16

# Dense bf16 peak per chip in TFLOP/s, keyed by jax's device_kind (vendor datasheets; TPU kinds
# as the TPU runtime spells them: v5e is "TPU v5 lite", v6e "TPU v6 lite"; "TPU v4 lite" is
# v4i, deliberately absent). Unknown kinds (CPU) give no MFU unless --peak_tflops is set.
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4,   # H100 SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H200": 989.4,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0, "TPU v5e": 197.0,
    "TPU v5": 459.0, "TPU v5p": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}


def device_peak_tflops(kind: str) -> float | None:
  """The chip's dense bf16 peak in TFLOP/s, or None when the kind is not in the table."""
  if kind in PEAK_BF16_TFLOPS:
    return PEAK_BF16_TFLOPS[kind]
  for prefix in ("NVIDIA H200", "NVIDIA A100"):  # other memory sizes of the same chip
    if kind.startswith(prefix):
      return PEAK_BF16_TFLOPS["NVIDIA H200" if prefix == "NVIDIA H200" else "NVIDIA A100-SXM4-80GB"]
  return None


@dataclasses.dataclass(frozen=True)
class Case:
  model: str
  frames: int          # 0: images
  image_size: int
  attention: str       # 'fused' | 'reference' (StructSAConfig.form)

  @property
  def input_shape(self) -> tuple[int, ...]:
    s = self.image_size
    return (self.frames, s, s, 3) if self.frames else (s, s, 3)

  @property
  def input_name(self) -> str:
    return f"{self.frames}x{self.image_size}" if self.frames else f"{self.image_size}"


# ----------------------------------------------------------------------------- building


def make_config(a: argparse.Namespace, case: Case, batch: int):
  """configs/base.py (the ImageNet recipe: AdamW, mixup/cutmix, label smoothing) for `case`."""
  base = config_utils.import_sibling(os.path.join(REPO, "configs", "base.py"), "base")
  c = base.get_base_config()
  c.model.name = case.model
  fields = model_fields(case.model)
  if "structsa" in fields:
    c.model.kwargs.structsa = dict(form=case.attention)
  elif case.attention != "fused":
    raise ValueError(f"{case.model} has no StructSA (`structsa` field); "
                     f"use --attention=fused for it")
  c.dtype = {"bf16": "bfloat16", "fp32": "float32"}[a.dtype]
  c.remat = a.remat
  c.batch_size = batch
  c.num_train_steps = 10_000  # only the lr schedule's length: any value is the same work
  c.data.name = "synthetic_video" if case.frames else "synthetic_image"
  c.data.image_size = case.image_size
  c.data.num_frames = case.frames
  c.data.train_examples = max(4096, 4 * batch)
  c.data.num_workers = a.data_workers
  return c


def num_classes(case: Case) -> int:
  preset = PRESETS[case.model][1]
  return preset.get("num_classes", 400 if case.frames else 1000)  # K400 / ImageNet heads


class Bench:
  """The trainer's jitted train / eval steps for one case, with state and random batches."""

  def __init__(self, a, case: Case, batch: int, mesh):
    self.case, self.batch, self.mesh = case, batch, mesh
    self.config = c = make_config(a, case, batch)
    self.num_classes = num_classes(case)
    self.model = train_state.build_model(c, self.num_classes)
    # train._Setup's wiring after its inputs (the dataset is the only thing missing).
    schedule = optim.make_schedule(c, c.num_train_steps, 1000)
    tx = optim.make_optimizer(c, schedule)
    _, shardings, init = train_state.make_init(c, self.model, tx, case.input_shape, mesh, 0)
    self.state = init()
    self.data_sharding = shard_lib.batch_sharding(mesh)
    # The trainer's inputs are uint8, normalised in the step with the dataset's constants.
    from structvit_jax.data import ops, registry
    spec = registry.get_dataset(c, c.data.train_split, train=True)
    norm = ops.device_side(spec.transforms)[1]
    self.train_fn = train_state.jit_train_step(c, self.model, tx, schedule, self.num_classes,
                                               norm, shardings, mesh)
    self.eval_fn = train_state.jit_eval_step(self.model, norm, shardings, mesh)
    self.batches = [self._random_batch(jax.random.PRNGKey(i)) for i in range(2)]

  def _random_batch(self, key) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(key)
    b = self.batch
    image = jax.random.randint(k1, (b, *self.case.input_shape), 0, 256).astype(jnp.uint8)
    label = jax.random.randint(k2, (b,), 0, self.num_classes, jnp.int32)
    out = dict(image=image, label=label, mask=jnp.ones((b,), jnp.bool_))
    return jax.device_put(out, self.data_sharding)

  def compile(self, mode: str):
    """(executable, fn(batch) running one step, compile seconds)."""
    t0 = time.perf_counter()
    if mode == "train":
      batch = {k: self.batches[0][k] for k in ("image", "label")}
      exe = self.train_fn.lower(self.state, batch).compile()
      def step(batch):
        self.state, metrics = exe(self.state, {k: batch[k] for k in ("image", "label")})
        return metrics
    else:
      exe = self.eval_fn.lower(self.state.params, self.state.batch_stats,
                               self.batches[0]).compile()
      step = lambda batch: exe(self.state.params, self.state.batch_stats, batch)
    return exe, step, time.perf_counter() - t0


# ----------------------------------------------------------------------------- measuring


def compiled_bytes(exe) -> int | None:
  """Per-device bytes the executable needs: arguments + outputs + temporaries - aliased
  (donated) buffers, from XLA's memory analysis."""
  m = exe.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


def runtime_peak_bytes() -> int | None:
  """The allocator's high-water mark on device 0 (GPU/TPU; None on CPU). Process-wide and
  monotone: in a sweep it is the largest so far, not this row's."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # not implemented by this backend
    return None
  return (stats or {}).get("peak_bytes_in_use")


def time_steps(step, batches, warmup: int, steps: int, windows: int) -> list[float]:
  """Seconds per step of each window (one device sync per window)."""
  out = None
  for i in range(warmup):
    out = step(batches[i % len(batches)])
  jax.block_until_ready(out)
  windows = max(1, min(windows, steps))
  per_window = max(1, steps // windows)
  times = []
  for w in range(windows):
    t0 = time.perf_counter()
    for i in range(per_window):
      out = step(batches[i % len(batches)])
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / per_window)
  return times


def time_pipeline(bench: Bench, step, warmup: int, steps: int) -> dict[str, float]:
  """Steps fed as the trainer feeds them (create_input's uint8 batches, normalised in the
  step, put on the devices by device_input's prefetch thread): seconds per step, host
  seconds per step spent waiting for the next batch, bytes per example sent."""
  from structvit_jax import device_input
  from structvit_jax.data import pipeline
  nproc = jax.process_count()
  inp = pipeline.create_input(bench.config, "train", bench.batch // nproc,
                              process_index=jax.process_index(), process_count=nproc,
                              uint8=True)
  sent = {"bytes": 0}

  def put(b):
    local = dict(image=b["image"], label=b["label"])
    sent["bytes"] = sum(v[0].nbytes for v in local.values())
    return shard_lib.global_batch(bench.mesh, {**local, "mask": np.ones(len(b["label"]), bool)})

  it = device_input.DevicePrefetcher(inp.iterator, put)
  next_batch = lambda: next(it)
  try:
    out = None
    for _ in range(max(1, warmup)):  # worker start-up and first reads stay out
      out = step(next_batch())
    jax.block_until_ready(out)
    fetch = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
      t = time.perf_counter()
      batch = next_batch()
      fetch += time.perf_counter() - t
      out = step(batch)
    jax.block_until_ready(out)
    total = time.perf_counter() - t0
  finally:
    it.close()
  return dict(step_s=total / steps, fetch_s=fetch / steps, bytes_per_example=sent["bytes"])


_SKIP_EVENTS = ("ThreadpoolListener", "end: ", "ThunkExecutor", "PjitFunction", "$",
                "SlinkyThreadPool")


def _op_names(exe) -> dict[str, str]:
  """HLO instruction name -> the jax op it came from (metadata op_name), from the compiled
  module's text, so the profile's fusion.123 reads as blocks3_0/attn/.../dot_general."""
  names = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]+)\"",
                       exe.as_text() or "", re.M):
    names[m.group(1)] = m.group(2)
  return names


def _group(op_name: str) -> str:
  """jit(train_step)/jvp(UniFormer)/blocks3_5/attn/.../dot_general -> 'blocks3_*/attn/...':
  one row per kind of op, summed over the blocks of a stage (forward and backward)."""
  keep = [p for p in op_name.split("/") if not p.startswith(("jit(", "jvp(", "transpose("))]
  keep = [re.sub(r"^(blocks\d+)_\d+$", r"\1_*", p) for p in keep]
  blocks = [i for i, p in enumerate(keep) if p.startswith("blocks")]
  keep = keep[blocks[0]:] if blocks else keep[-3:]
  return "/".join(keep[:2] + keep[-2:] if len(keep) > 4 else keep)


def profile_top_ops(exe, step, batches, steps: int, top: int) -> list[tuple[str, float, float]]:
  """Traces `steps` steps with jax.profiler and returns the `top` kinds of ops by total time:
  (op group, ms per step, % of the profiled op time). Device planes (GPU/TPU 'XLA Ops') when
  present, else the CPU runtime threads (several threads: op time can exceed wall time)."""
  import glob
  import tempfile
  from jax.profiler import ProfileData
  jax.block_until_ready(step(batches[0]))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      out = None
      for i in range(steps):
        out = step(batches[i % len(batches)])
      jax.block_until_ready(out)
    files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    if not files:
      return []
    data = ProfileData.from_file(files[0])
  planes = [p for p in data.planes if p.name.startswith("/device:")]
  if planes:
    lines = [l for p in planes for l in p.lines if l.name == "XLA Ops"] or \
            [l for p in planes for l in p.lines]
  else:
    lines = [l for p in data.planes if p.name == "/host:CPU" for l in p.lines
             if l.name != "python"]
  totals: dict[str, float] = {}
  for line in lines:
    for e in line.events:
      if e.duration_ns <= 0 or e.name.startswith(_SKIP_EVENTS):
        continue
      totals[e.name] = totals.get(e.name, 0.0) + e.duration_ns
  names = _op_names(exe)
  groups: dict[str, float] = {}
  for n, t in totals.items():
    g = _group(names[n]) if n in names else re.sub(r"\.\d+$", "", n)
    groups[g] = groups.get(g, 0.0) + t
  whole = sum(groups.values()) or 1.0
  ranked = sorted(groups.items(), key=lambda kv: -kv[1])[:top]
  return [(g, t / steps / 1e6, 100 * t / whole) for g, t in ranked]


def is_oom(e: BaseException) -> bool:
  s = str(e)
  return "RESOURCE_EXHAUSTED" in s or "Out of memory" in s or "out of memory" in s


def base_row(a, case: Case, mode: str, batch: int) -> dict[str, Any]:
  return dict(model=case.model, input=case.input_name, mode=mode, dtype=a.dtype,
              attention=case.attention, batch=batch, remat=a.remat)


def measure(a, bench: Bench, row: dict[str, Any], mode: str, ndev: int,
            peak_tflops: float | None, macs: int | None) -> dict[str, Any]:
  """Fills `row` as it goes, so a run-time OOM still leaves the compiled memory in it."""
  batch = row["batch"]
  exe, step, compile_s = bench.compile(mode)
  row["compile_s"] = compile_s
  cb = compiled_bytes(exe)
  row["compiled_mib"] = None if cb is None else cb / 2**20
  if a.compile_only:
    row["note"] = "compile only"
    return row
  times = time_steps(step, bench.batches, a.warmup, a.steps, a.windows)
  step_s = statistics.median(times)
  row.update(step_ms=step_s * 1e3, spread_pct=100 * (max(times) - min(times)) / step_s,
             windows=len(times), per_sec=batch / step_s)
  if a.profile:
    row["top_ops"] = profile_top_ops(exe, step, bench.batches, max(2, min(a.steps, 5)),
                                     a.profile)
  peak = runtime_peak_bytes()
  row["runtime_peak_mib"] = None if peak is None else peak / 2**20
  if macs is not None:
    flops = 2 * macs * batch * (3 if mode == "train" else 1)  # backward = 2x forward
    row["gflops_per_example"] = flops / batch / 1e9
    row["tflops"] = flops / step_s / 1e12
    row["mfu_pct"] = (None if peak_tflops is None
                      else 100 * row["tflops"] / (peak_tflops * ndev))
  if a.data == "pipeline":
    p = time_pipeline(bench, step, a.warmup, max(a.steps, 2))
    row.update(pipeline_step_ms=p["step_s"] * 1e3, pipeline_fetch_ms=p["fetch_s"] * 1e3,
               pipeline_bytes_per_example=p["bytes_per_example"],
               pipeline_per_sec=batch / p["step_s"],
               data_wait_pct=100 * max(0.0, 1 - step_s / p["step_s"]))
  return row


def forward_macs(case: Case) -> int | None:
  """Paper-convention forward MACs per example (flops.py), always of the fused attention:
  MFU counts the model's work, not the extra work of the literal reference path."""
  from structvit_jax.models import get_model
  kw = dict(num_classes=num_classes(case))
  if "structsa" in model_fields(case.model):
    kw["structsa"] = dict(form="fused")
  try:
    return flops_lib.count_model_macs(get_model(case.model, **kw), case.input_shape)["total"]
  except Exception as e:  # informative only: the timing rows still stand
    print(f"# MAC count of {case.model} {case.input_name} failed: {e}", file=sys.stderr)
    return None


# ----------------------------------------------------------------------------- output

COLUMNS = (("model", "model", "{}"), ("input", "input", "{}"), ("mode", "mode", "{}"),
           ("dtype", "dtype", "{}"), ("attention", "attn", "{}"), ("batch", "batch", "{}"),
           ("step_ms", "step ms", "{:.1f}"), ("spread_pct", "spread %", "{:.0f}"),
           ("per_sec", "ex/s", "{:.1f}"), ("gflops_per_example", "GFLOP/ex", "{:.2f}"),
           ("tflops", "TFLOP/s", "{:.3g}"), ("mfu_pct", "MFU %", "{:.1f}"),
           ("compiled_mib", "compiled MiB", "{:.0f}"),
           ("runtime_peak_mib", "peak in use MiB", "{:.0f}"),
           ("compile_s", "compile s", "{:.1f}"), ("data_wait_pct", "data wait %", "{:.0f}"),
           ("note", "note", "{}"))


def table_row(row: dict[str, Any]) -> str:
  cells = []
  for key, _, fmt in COLUMNS:
    v = row.get(key)
    cells.append("n/a" if v is None else fmt.format(v))
  return "| " + " | ".join(cells) + " |"


def footer(a) -> list[str]:
  lines = [
      "step ms: median over windows of (window wall time / steps), one device sync per window; "
      "spread: (max - min) / median over windows. ex/s: images or clips per second (global).",
      "GFLOP/ex: 2 x paper-convention MACs of the forward (structvit_jax.flops, fused "
      "attention), x3 for training; MFU = TFLOP/s / (peak x devices) (n/a: unknown device "
      "peak, pass --peak_tflops).",
      "compiled MiB: per device, XLA memory_analysis of the executable: arguments + outputs + "
      "temporaries - donated (aliased). peak in use: the allocator's process-wide high-water "
      "mark on device 0 (GPU/TPU only; monotone across rows).",
  ]
  if a.data == "pipeline":
    lines.append("data wait: 1 - (step time on pre-placed inputs) / (step time fed by "
                 "create_input on the synthetic dataset: uint8, normalised in the step, "
                 "prefetched to the devices as the trainer does); note gives the pipeline's "
                 "own rate, host ms per batch waiting for it, and bytes per example sent.")
  return lines


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="structvit_s_4_1",
                  help="preset name(s), comma-separated (structvit_jax.models.list_models())")
  ap.add_argument("--video", action="store_true", help="clips of --frames frames")
  ap.add_argument("--frames", type=int, default=16)
  ap.add_argument("--inputs", default="",
                  help="comma-separated 'image' and/or 'video' (overrides --video)")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=0,
                  help="global batch, split over all local devices (0: 128 images or 8 clips "
                       "per device)")
  ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                  help="compute dtype; params and optimiser state stay fp32")
  ap.add_argument("--attention", default="fused",
                  help="StructSA implementation(s), comma-separated: fused, reference")
  ap.add_argument("--mode", choices=("train", "infer", "both"), default="both")
  ap.add_argument("--cases", default="",
                  help="explicit INPUT:ATTENTION:MODE list for each --model, comma-separated, "
                       "e.g. image:fused:both,video:reference:train (overrides --inputs, "
                       "--video, --attention and --mode)")
  ap.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
  ap.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  ap.add_argument("--windows", type=int, default=5,
                  help="timed steps are split into this many windows; the median is reported")
  ap.add_argument("--remat", action="store_true", help="rematerialise each block")
  ap.add_argument("--compile_only", action="store_true",
                  help="compile and report memory without running steps (does it fit?)")
  ap.add_argument("--data", choices=("synthetic", "pipeline"), default="synthetic",
                  help="pipeline: also time the steps fed by create_input (data wait)")
  ap.add_argument("--data_workers", type=int, default=0,
                  help="grain worker processes for --data=pipeline (0: in-process threads)")
  ap.add_argument("--sweep", action="store_true",
                  help=f"{', '.join(SWEEP_MODELS)}; images and {SWEEP_FRAMES}-frame clips; "
                       "train and infer")
  ap.add_argument("--peak_tflops", type=float, default=0.0,
                  help="per-device bf16 peak for MFU (0: from the device table)")
  ap.add_argument("--json", action="store_true", help="JSON lines instead of a table")
  ap.add_argument("--profile", type=int, default=0, metavar="N",
                  help="trace a few steps with jax.profiler and print the N ops that take "
                       "the most time (what limits speed)")
  a = ap.parse_args(argv)
  if a.sweep:
    a.model, a.inputs, a.mode, a.frames = ",".join(SWEEP_MODELS), "image,video", "both", SWEEP_FRAMES
  a.models = [m.strip() for m in a.model.split(",") if m.strip()]
  for m in a.models:
    if m not in PRESETS:
      ap.error(f"--model: unknown preset {m!r}; valid: {', '.join(list_models())}")
  a.attentions = [s.strip() for s in a.attention.split(",") if s.strip()]
  for s in a.attentions:
    if s not in ("fused", "reference"):
      ap.error(f"--attention: {s!r}; valid: fused, reference")
  inputs = [s.strip() for s in (a.inputs or ("video" if a.video else "image")).split(",")]
  for s in inputs:
    if s not in ("image", "video"):
      ap.error(f"--inputs: {s!r}; valid: image, video")
  if a.cases:
    a.case_list = []
    for spec in a.cases.split(","):
      parts = spec.strip().split(":")
      if (len(parts) != 3 or parts[0] not in ("image", "video")
          or parts[1] not in ("fused", "reference") or parts[2] not in ("train", "infer", "both")):
        ap.error(f"--cases: {spec!r} is not INPUT:ATTENTION:MODE with INPUT image|video, "
                 "ATTENTION fused|reference, MODE train|infer|both")
      a.case_list.append(tuple(parts))
  else:
    a.case_list = [(s, att, a.mode) for s in inputs for att in a.attentions]
  if any(c[0] == "video" for c in a.case_list) and a.frames < 1:
    ap.error(f"--frames={a.frames} must be >= 1 for video")
  if a.steps < 1 or a.warmup < 0 or a.windows < 1:
    ap.error("--steps and --windows must be >= 1 and --warmup >= 0")
  return a


def main(argv=None) -> int:
  a = parse_args(argv)
  # grain's worker processes read its absl flags: parsed here as no absl app parses them.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  devices = jax.local_devices()
  ndev = len(devices)
  mesh = shard_lib.make_mesh(devices)
  kind = devices[0].device_kind
  peak = a.peak_tflops or device_peak_tflops(kind)
  header = dict(device=kind, platform=devices[0].platform, devices=ndev, jax=jax.__version__,
                peak_tflops_per_device=peak,
                command=shlex.join([os.path.basename(sys.executable)] + sys.argv))
  emit = lambda s: print(s, flush=True)
  if a.json:
    emit(json.dumps(dict(kind="header", **header)))
  else:
    emit(f"# {ndev} x {kind} ({header['platform']}), jax {jax.__version__}, "
         f"bf16 peak {'unknown' if peak is None else f'{peak:g} TFLOP/s'} per device")
    emit(f"# {header['command']}")
    emit("| " + " | ".join(c[1] for c in COLUMNS) + " |")
    emit("|" + "---|" * len(COLUMNS))

  failed = False
  macs_cache: dict[tuple[str, int], int | None] = {}
  for model in a.models:
    for input_name, attention, mode_arg in a.case_list:
      frames = a.frames if input_name == "video" else 0
      case = Case(model, frames, a.image_size, attention)
      if (model, frames) not in macs_cache:
        macs_cache[model, frames] = forward_macs(case)
      macs = macs_cache[model, frames]
      # Inference first: the train step donates the state, so a failed train step can
      # leave nothing for inference to read.
      modes = ("infer", "train") if mode_arg == "both" else (mode_arg,)
      batch = a.batch or (8 if frames else 128) * ndev
      bench, err = None, None
      try:
        if batch % ndev:
          raise ValueError(f"--batch={batch} is not divisible by the {ndev} local devices")
        bench = Bench(a, case, batch, mesh)
      except Exception as e:
        err = e
      for mode in modes:
        row, mode_err, ok = base_row(a, case, mode, batch), err, False
        if err is None:
          try:
            measure(a, bench, row, mode, ndev, peak, macs)
            ok = True
            if a.data == "pipeline" and not a.compile_only:
              row["note"] = (f"pipeline {row['pipeline_per_sec']:.1f} ex/s, "
                             f"{row['pipeline_fetch_ms']:.0f} ms/batch on host, "
                             f"{row['pipeline_bytes_per_example']} B/example"
                             + ("; data-bound" if row["data_wait_pct"] > 5 else ""))
          except Exception as e:
            mode_err = e
        if not ok:
          if is_oom(mode_err):
            row["note"] = "OOM"
          else:
            failed = True
            msg = (str(mode_err).splitlines() or [""])[0][:200]
            row["note"] = f"ERROR {type(mode_err).__name__}: {msg}"
            print(f"# {case} {mode}: {mode_err!r}", file=sys.stderr)
        emit(json.dumps(dict(kind="row", **row)) if a.json else table_row(row))
        if row.get("top_ops") and not a.json:
          emit(f"#   top ops, {model} {input_name} {mode} (ms/step, % of op time):")
          for op, ms, pct in row["top_ops"]:
            emit(f"#     {ms:9.1f} ms {pct:5.1f}%  {op}")
      bench = None
      gc.collect()  # free this case's state before the next one is built
  if not a.json:
    for line in footer(a):
      emit(f"# {line}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
