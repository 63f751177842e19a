#!/usr/bin/env bash
# N JAX processes on this machine, each with D fake CPU devices, joined by jax.distributed
# (gloo collectives): the multi-host code path without a cluster, for tests and debugging.
#
#   launch/local_multiprocess.sh N D -- python -m facemoe_jax.main --config configs/demo.py \
#       --workdir runs/demo_mp --config.mesh.expert=4
#
# Every process runs the same command; facemoe_jax.parallel.multihost reads FACEMOE_COORDINATOR,
# FACEMOE_NUM_PROCESSES and FACEMOE_PROCESS_ID. Output lines carry a "[host i/N]" prefix. If one
# process fails the others are stopped (they would wait forever in a collective), and the
# script exits with the failing status (non-zero; 0 only when every process succeeded).
set -euo pipefail

if [ $# -lt 3 ] || [ "$3" != "--" ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- COMMAND..." >&2
  exit 2
fi
num_processes=$1
devices=$2
shift 3
port=${FACEMOE_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
for ((i = 0; i < num_processes; i++)); do
  FACEMOE_COORDINATOR="127.0.0.1:$port" FACEMOE_NUM_PROCESSES="$num_processes" \
    FACEMOE_PROCESS_ID="$i" JAX_PLATFORMS=cpu \
    XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" \
    "$@" &
  pids+=("$!")
done

# Wait for the processes one at a time (`wait -n` with no ids: any child; ids already reaped
# would print "no such job"). The first non-zero status stops the others: SIGTERM, then SIGKILL
# after a grace period (a process blocked in a collective may never act on SIGTERM).
status=0
for ((left = num_processes; left > 0; left--)); do
  rc=0
  wait -n || rc=$?
  if [ "$rc" -ne 0 ]; then
    status=$rc
    echo "local_multiprocess: a process exited with status $rc; stopping the others" >&2
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((tick = 0; tick < ${FACEMOE_KILL_GRACE_TICKS:-50}; tick++)); do
      [ -z "$(jobs -rp)" ] && break  # running jobs only (an ended one is a zombie to kill -0)
      sleep 0.2
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    break
  fi
done
wait 2>/dev/null || true
exit "$status"
