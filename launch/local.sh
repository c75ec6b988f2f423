#!/usr/bin/env bash
# Start NPROC processes of one multi-process JAX run on this machine.
#
#   launch/local.sh NPROC [CMD ARGS...]
#   launch/local.sh 2                                  # python -m blox_scale.cli.train
#   launch/local.sh 2 python -m blox_scale.cli.train --config configs/tiny.yaml mesh.fsdp=2
#   BLOX_DEVICES_PER_PROCESS=4 launch/local.sh 2 python my_loop.py
#
# Every process gets its own K fake CPU devices (BLOX_DEVICES_PER_PROCESS,
# default 2) and joins the others through a coordinator on 127.0.0.1 at a
# free port: blox_scale.parallel.distributed.initialize() reads BLOX_COORDINATOR_ADDRESS,
# BLOX_NUM_PROCESSES and BLOX_PROCESS_ID. Output lines are prefixed with
# "[p<id>] ". The script exits with the first non-zero status of any process
# (0 when all succeed). If a process fails, JAX's heartbeat terminates the
# others (distributed.heartbeat_timeout); as a backstop, processes still
# running BLOX_FAIL_GRACE seconds (default 90) after the first failure are
# killed. Ctrl-C stops them all.
set -u

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NPROC [CMD ARGS...]   (NPROC >= 1; default CMD: python3 -m blox_scale.cli.train)" >&2
  exit 2
fi
NPROC=$1
shift
if [[ $# -eq 0 ]]; then
  set -- python3 -m blox_scale.cli.train
fi
DEVICES=${BLOX_DEVICES_PER_PROCESS:-2}
GRACE=${BLOX_FAIL_GRACE:-90}

# A free port: bind to port 0 on loopback and read what the kernel chose.
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

declare -a PIDS=()
stop_all() {
  for pid in "${PIDS[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < NPROC; i++)); do
  # Each process in its own process group (set -m) so that stop_all reaches
  # its children (the sed prefixer and anything the command spawns).
  set -m
  (
    export BLOX_COORDINATOR_ADDRESS="127.0.0.1:${PORT}"
    export BLOX_NUM_PROCESSES="$NPROC"
    export BLOX_PROCESS_ID="$i"
    export JAX_PLATFORMS=cpu
    export PYTHONUNBUFFERED=1
    # Replace any device-count flag the caller had; keep the other XLA flags.
    flags=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
    export XLA_FLAGS="$flags --xla_force_host_platform_device_count=${DEVICES}"
    set -o pipefail
    "$@" 2>&1 | sed -u "s/^/[p${i}] /"
  ) &
  PIDS+=($!)
  set +m
done

# Poll once a second (rather than `wait -n`) so the failure backstop can fire
# while other processes are still running.
status=0
deadline=0
declare -A DONE=()
while ((${#DONE[@]} < NPROC)); do
  for ((i = 0; i < NPROC; i++)); do
    pid=${PIDS[$i]}
    [[ -n "${DONE[$i]:-}" ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid"
    rc=$?
    DONE[$i]=$rc
    if ((rc != 0)); then
      echo "[local.sh] process $i exited with status $rc" >&2
      if ((status == 0)); then
        status=$rc
        deadline=$((SECONDS + GRACE))
      fi
    fi
  done
  if ((deadline > 0 && SECONDS >= deadline && ${#DONE[@]} < NPROC)); then
    echo "[local.sh] processes still running ${GRACE}s after the first failure; killing them" >&2
    stop_all
    deadline=0
  fi
  ((${#DONE[@]} < NPROC)) && sleep 0.5
done
exit $status
