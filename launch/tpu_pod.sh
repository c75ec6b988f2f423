#!/usr/bin/env bash
# Run blox-train on every worker of a Cloud TPU pod slice (multi-host TPU VM).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--project P] -- --config configs/llama_7b.yaml mesh.fsdp=-1
#
# The same command runs on all hosts (`--worker=all`). On TPU VMs
# jax.distributed.initialize() needs no arguments: blox_scale.parallel.distributed
# sees TPU_WORKER_HOSTNAMES and lets JAX read the coordinator, the process
# count and this host's id from the TPU metadata. Every host must see the
# same code and data paths, and train.workdir must be one directory all hosts
# share (e.g. a Filestore/NFS mount or a gcsfuse-mounted bucket): every host
# writes its shards of each checkpoint there.
#
# Environment:
#   BLOX_REPO   where the repo lives on the workers (default: ~/blox)
#   BLOX_SETUP  a command run first on every worker (default: pip install -q -e "$BLOX_REPO[tpu]",
#               jax with the TPU runtime)
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [--project PROJECT] [-- TRAIN ARGS...]" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
shift 2
PROJECT_ARGS=()
if [[ "${1:-}" == "--project" ]]; then
  PROJECT_ARGS=(--project "$2")
  shift 2
fi
[[ "${1:-}" == "--" ]] && shift
ARGS=$(printf ' %q' "$@")
REPO=${BLOX_REPO:-'~/blox'}
SETUP=${BLOX_SETUP:-"pip install -q -e '$REPO[tpu]'"}

# One SSH session per worker, all at once; output is prefixed by gcloud with
# the worker id. A worker that dies makes the others exit within
# distributed.heartbeat_timeout seconds, so this command returns instead of hanging.
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all \
  --command "cd $REPO && $SETUP && PYTHONUNBUFFERED=1 python3 -m blox_scale.cli.train$ARGS"
