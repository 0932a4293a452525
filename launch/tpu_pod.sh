#!/usr/bin/env bash
# Trains structvit_jax on a Cloud TPU VM pod slice (e.g. v4-32: 4 hosts x 4 chips), from
# your workstation: creates the slice unless it exists, copies this checkout (or clones
# REPO_URL) to every worker, installs jax[tpu] + requirements.txt + the package into a venv
# on every worker, then starts `python -m structvit_jax.main` on all workers at once.
# `--config.distributed.enabled=True` makes every process call jax.distributed.initialize()
# without arguments, which finds the other workers of the slice by itself on a TPU VM.
#
#   TPU_NAME=my-pod ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 WORKDIR=/mnt/nfs/run1 \
#     launch/tpu_pod.sh configs/in1k_s.py --config.data.data_dir=/mnt/nfs/tfds
#
# Usage: launch/tpu_pod.sh CONFIG [structvit_jax.main flags...]
#   CONFIG is a config file path relative to the repository root (variants allowed:
#   configs/in1k_s.py:d=8); the remaining arguments go to structvit_jax.main unchanged.
#
# Variables (environment):
#   TPU_NAME          required. Name of the TPU VM slice; reused when it already exists.
#   ZONE              required. Zone of the slice, e.g. us-central2-b (v4), europe-west4-a.
#   WORKDIR           required. Checkpoints, TensorBoard events, eval_results.jsonl. Every
#                     worker writes its shards of each checkpoint there, so it must be one
#                     place all workers see: a Cloud Storage URL gs://BUCKET/PATH (the
#                     workers' service account needs write access), or an absolute path on
#                     an NFS / Filestore or Cloud Storage FUSE (gcsfuse) mount present at
#                     that path on every worker. Other URL schemes are refused, and so is
#                     --config.data.data_dir=gs://...: datasets are read from a local disk or
#                     a mount.
#   ACCELERATOR_TYPE  TPU type and size when creating the slice (default v4-32).
#   RUNTIME_VERSION   TPU VM software version when creating (default tpu-ubuntu2204-base).
#   PROJECT           Google Cloud project (default: gcloud's configured core/project).
#   SPOT              1: create the slice as a Spot VM (--spot); it can be preempted.
#   REPO_URL          git URL cloned on every worker (with REPO_REF). Unset: this checkout's
#                     tracked and untracked-but-not-ignored files are copied instead.
#   REPO_REF          branch, tag or commit of REPO_URL (default: its default branch).
#   REMOTE_DIR        code directory on the workers, relative to the home (default structvit_jax).
#   REMOTE_PYTHON     interpreter for the workers' venv, >= 3.11 (default python3.11; apt-installed
#                     if missing). The venv is ~/structvit_venv on every worker.
#   SKIP_SETUP        1: skip copying and installing (restart on a slice already set up).
#   DETACH            1: start training under nohup (output in ~/REMOTE_DIR/train.log on each
#                     worker) and return; default: stay attached and stream every worker's output.
#
# Resume: run the same command again; every process restores the newest checkpoint in WORKDIR.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "error: missing CONFIG (the first argument)." >&2
  usage
fi
CONFIG=$1
shift
missing=()
for v in TPU_NAME ZONE WORKDIR; do
  [[ -n "${!v:-}" ]] || missing+=("$v")
done
if ((${#missing[@]})); then
  echo "error: set ${missing[*]} (see the variables below)." >&2
  usage
fi
if [[ "$WORKDIR" == *://* && ! "$WORKDIR" =~ ^gs://[^/]+ ]]; then
  echo "error: WORKDIR=$WORKDIR: the only URL workdirs supported are Cloud Storage ones," \
       "gs://BUCKET/PATH; or pass an absolute path on storage shared by all workers." >&2
  exit 2
fi
for arg in "$@"; do
  if [[ "$arg" == --config.data.data_dir=*://* ]]; then
    echo "error: $arg: datasets are read from a local disk or a mount (NFS, gcsfuse) on" \
         "every worker, not from a URL; copy the prepared dataset there." >&2
    exit 2
  fi
done
if [[ "$WORKDIR" != gs://* && "$WORKDIR" != /* ]]; then
  echo "error: WORKDIR=$WORKDIR must be an absolute path on storage shared by all workers." >&2
  exit 2
fi
if ! command -v gcloud >/dev/null 2>&1; then
  echo "error: gcloud not found; install the Google Cloud CLI (https://cloud.google.com/sdk)." >&2
  exit 1
fi

ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
REMOTE_DIR=${REMOTE_DIR:-structvit_jax}
REMOTE_PYTHON=${REMOTE_PYTHON:-python3.11}
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)

GC=(gcloud)
[[ -n "${PROJECT:-}" ]] && GC+=(--project="$PROJECT")
tpu() {  # gcloud compute tpus tpu-vm VERB TPU_NAME --zone=ZONE ARGS...
  local verb=$1
  shift
  "${GC[@]}" compute tpus tpu-vm "$verb" "$TPU_NAME" --zone="$ZONE" "$@"
}
on_all_workers() {  # runs one shell command line on every worker at once
  tpu ssh --worker=all --command="$1"
}

if tpu describe >/dev/null 2>&1; then
  echo "tpu_pod: reusing $TPU_NAME in $ZONE" >&2
else
  echo "tpu_pod: creating $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $ZONE" >&2
  create=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  [[ "${SPOT:-0}" == 1 ]] && create+=(--spot)
  tpu create "${create[@]}"
fi

q() { printf '%q' "$1"; }  # quotes one word for the remote shell

if [[ "${SKIP_SETUP:-0}" != 1 ]]; then
  if [[ -n "${REPO_URL:-}" ]]; then
    fetch="rm -rf ~/$(q "$REMOTE_DIR") && git clone $(q "$REPO_URL") ~/$(q "$REMOTE_DIR")"
    [[ -n "${REPO_REF:-}" ]] && fetch+=" && git -C ~/$(q "$REMOTE_DIR") checkout $(q "$REPO_REF")"
  else
    tarball=$(mktemp --suffix=.tgz)
    trap 'rm -f "$tarball"' EXIT
    if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard |
        tar -C "$REPO_ROOT" -czf "$tarball" --null -T -
    else
      tar -C "$REPO_ROOT" -czf "$tarball" --exclude=.git .
    fi
    echo "tpu_pod: copying $REPO_ROOT to every worker" >&2
    tpu scp "$tarball" "$TPU_NAME:structvit_jax_src.tgz" --worker=all
    fetch="rm -rf ~/$(q "$REMOTE_DIR") && mkdir -p ~/$(q "$REMOTE_DIR")"
    fetch+=" && tar -xzf ~/structvit_jax_src.tgz -C ~/$(q "$REMOTE_DIR")"
  fi
  py=$(q "$REMOTE_PYTHON")
  echo "tpu_pod: installing on every worker" >&2
  on_all_workers "set -e; $fetch
command -v $py >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q $py $py-venv; }
[ -x ~/structvit_venv/bin/python ] || $py -m venv ~/structvit_venv
. ~/structvit_venv/bin/activate && cd ~/$(q "$REMOTE_DIR")
pip install -q -U pip && pip install -U 'jax[tpu]' && pip install -r requirements.txt && pip install -e ."
fi

train=(python -m structvit_jax.main --config="$CONFIG" --workdir="$WORKDIR"
       --config.distributed.enabled=True "$@")
train_cmd=$(printf '%q ' "${train[@]}")
run="set -e; "
if [[ "$WORKDIR" != gs://* ]]; then
  # A missing mount would leave each worker writing its own local directory: refuse instead.
  parent=$(q "$(dirname "$WORKDIR")")
  run+="[ -d $parent ] || { echo \"error: \$(hostname): $parent does not exist; mount the shared storage of WORKDIR on every worker\" >&2; exit 1; }
"
fi
run+=". ~/structvit_venv/bin/activate && cd ~/$(q "$REMOTE_DIR")"
if [[ "${DETACH:-0}" == 1 ]]; then
  run+=" && nohup $train_cmd > train.log 2>&1 < /dev/null &"
else
  run+=" && $train_cmd"
fi
echo "tpu_pod: on every worker: $train_cmd" >&2
on_all_workers "$run"
