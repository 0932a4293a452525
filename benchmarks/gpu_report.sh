#!/usr/bin/env bash
# The GPU numbers of the README in one run: one markdown report.
#
#   bash benchmarks/gpu_report.sh [--out=gpu_report.md]     # on the GPU machine
#   bash benchmarks/gpu_report.sh --dry_run --out=/tmp/r.md  # every part, tiny, any CPU (CI)
#
# Parts (each a command of its own, printed above its output in the report):
#   1. device and versions
#   2. throughput sweep: benchmarks/throughput.py --sweep (UniFormer-S, StructViT-S, B; images
#      224 and 16x224 clips; train and infer; bf16)
#   3. fused vs reference StructSA on video: throughput.py --attention=fused,reference on
#      16x224 clips, and one StructSA layer's memory and time (structsa_memory.py)
#   4. depthwise convolution formulations: benchmarks/depthwise.py (xla vs shift)
#   5. start-up: time to the first training step, first run and restart on the
#      compilation cache (benchmarks/startup.py, configs/in1k_s.py on built-in data)
# A part that fails is marked FAILED in the report; the others still run; the exit status is
# then 1. PYTHON (default: python) runs the scripts.
set -u -o pipefail

OUT=gpu_report.md
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry_run) DRY=1 ;;
    --out=*) OUT="${arg#--out=}" ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $arg (--dry_run, --out=FILE)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
FAILED=0

if [ "$DRY" = 1 ]; then
  # Tiny settings: the same code paths, seconds on a CPU.
  # Inference steps only (the trainer's step compiles in the start-up part).
  SWEEP=(--model=structvit_tiny --image_size=32 --batch=2 --frames=2 --dtype=fp32
         --cases=image:fused:infer,video:fused:infer --steps=1 --warmup=1 --windows=1)
  VIDEO=(--model=structvit_tiny --video --image_size=32 --frames=2 --batch=2 --dtype=fp32
         --attention=fused,reference --mode=infer --steps=1 --warmup=1 --windows=1)
  LAYER=(--grid=2,4,4 --channels=8 --heads=1 --d=2 --train --time --repeats=1)
  DEPTHWISE=(--only="image s1 local" --repeats=1 --budget=0.1)
  STARTUP=(--config=configs/demo.py:train_examples=64 --runs=2 --
           --config.batch_size=8 --config.data.eval_examples=8)
else
  SWEEP=(--sweep)
  VIDEO=(--model=structvit_s_4_1,uniformer_s --video --frames=16 --batch=8
         --attention=fused,reference)
  LAYER=(--train --time)
  DEPTHWISE=(--dtype=bfloat16)
  STARTUP=(--config=configs/in1k_s.py --runs=2 -- --config.data.name=synthetic_image
           --config.batch_size=128 --config.data.num_workers=0)
fi

part() {  # part TITLE COMMAND...: runs COMMAND, appends its output to the report
  local title="$1"; shift
  echo "== $title: $*" >&2
  local log; log="$(mktemp)"
  local t0=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  {
    echo "## $title"
    echo
    echo "\`$*\` ($((SECONDS - t0)) s)"
    echo
    if [ $rc -ne 0 ]; then
      FAILED=1
      echo "**FAILED (exit status $rc)**; the last lines:"
      echo
      echo '```'
      tail -n 40 "$log"
      echo '```'
    else
      # Tables as they are; the rest (progress lines) trimmed.
      grep -E '^\||^(backend|device|configs/)' "$log" || tail -n 20 "$log"
    fi
    echo
  } >>"$OUT"
  [ $rc -eq 0 ] || FAILED=1
  rm -f "$log"
  return 0
}

{
  echo "# StructViT-JAX GPU report"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$([ "$DRY" = 1 ] && echo ', DRY RUN (tiny settings, not numbers to keep)')"
  echo
  echo '```'
  "$PY" -c 'import jax, flax; d = jax.devices(); print(f"jax {jax.__version__}, flax {flax.__version__}, {len(d)} x {d[0].device_kind} ({jax.default_backend()})")' 2>&1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  echo '```'
  echo
} >"$OUT"

part "Throughput" "$PY" benchmarks/throughput.py "${SWEEP[@]}"
part "Fused vs reference StructSA, video" "$PY" benchmarks/throughput.py "${VIDEO[@]}"
part "One StructSA layer, fused vs reference" "$PY" benchmarks/structsa_memory.py "${LAYER[@]}"
part "Depthwise convolutions" "$PY" benchmarks/depthwise.py "${DEPTHWISE[@]}"
part "Start-up (time to the first step)" "$PY" benchmarks/startup.py "${STARTUP[@]}"

echo "wrote $OUT" >&2
exit $FAILED
