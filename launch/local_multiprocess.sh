#!/usr/bin/env bash
# N processes of `python -m structvit_jax.main` on 127.0.0.1 training one job together
# (jax.distributed + gloo CPU collectives), each with DEVICES_PER_PROCESS simulated CPU
# devices. If one process fails, the others are killed and the script exits non-zero.
#
#   DEVICES_PER_PROCESS=2 launch/local_multiprocess.sh 2 --config=configs/demo.py --workdir=/tmp/w
#
# Environment: DEVICES_PER_PROCESS (default 1), PYTHON (default python), LOG_DIR (if set,
# process i writes LOG_DIR/process_i.log instead of the console).
set -u

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 NUM_PROCESSES [structvit_jax.main flags...]" >&2
  exit 2
fi
NUM=$1
shift
PER=${DEVICES_PER_PROCESS:-1}
PYTHON=${PYTHON:-python}
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
[[ -n "${LOG_DIR:-}" ]] && mkdir -p "$LOG_DIR"

declare -A PIDS=()   # pid -> process index
cleanup() {
  for pid in "${!PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  sleep 2
  for pid in "${!PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
}
# Ctrl-C / SIGTERM of the launcher reaches every process (SIGTERM: they save and exit 0).
trap 'for pid in "${!PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done' TERM INT

echo "local_multiprocess: $NUM processes x $PER CPU devices, coordinator 127.0.0.1:$PORT" >&2
# Inherited XLA flags stay, except a device count of the caller's (the last one would win).
OTHER_XLA_FLAGS=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=$PER $OTHER_XLA_FLAGS"
for ((i = 0; i < NUM; i++)); do
  cmd=("$PYTHON" -m structvit_jax.main "$@" --coordinator_address="127.0.0.1:$PORT"
       --num_processes="$NUM" --process_id="$i")
  if [[ -n "${LOG_DIR:-}" ]]; then
    "${cmd[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  else
    "${cmd[@]}" &
  fi
  PIDS[$!]=$i
done

status=0
while ((${#PIDS[@]} > 0)); do
  done_pid=""
  wait -n -p done_pid "${!PIDS[@]}"
  rc=$?
  [[ -z "${done_pid:-}" ]] && continue   # interrupted by a trapped signal: wait again
  idx=${PIDS[$done_pid]}
  unset "PIDS[$done_pid]"
  if ((rc != 0)); then
    echo "local_multiprocess: process $idx (pid $done_pid) exited with status $rc;" \
         "stopping the other ${#PIDS[@]} process(es)." >&2
    cleanup
    status=$rc
    break
  fi
done
exit $status
