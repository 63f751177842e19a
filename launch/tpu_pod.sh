#!/usr/bin/env bash
# Cloud TPU pod slice: copy this checkout to every TPU VM worker, install the requirements,
# run a preflight check, then the same command on all workers at once.
#
#   launch/tpu_pod.sh my-v4-32 us-central2-b -- python -m facemoe_jax.main \
#       --config configs/vit_b_moe.py --workdir gs://my-bucket/runs/vitb --config.mesh.expert=8
#
# Options (environment): TPU_PROJECT (gcloud project), TPU_EXPECTED_DEVICES (e.g. 16 for a
# v4-32: the preflight fails unless every host sees that many), TPU_SKIP_INSTALL=1 (code only),
# TPU_PYTHON (the workers' Python 3.11+, default python3: older TPU VM images ship 3.10).
# jax.distributed finds the other hosts through the TPU metadata (multihost.py); each line of
# output is prefixed with its worker by gcloud and with "[host i/n]" by the program; only
# process 0 writes summaries. The workdir should be a gs:// bucket all hosts can write.
set -euo pipefail

if [ $# -lt 4 ] || [ "$3" != "--" ]; then
  echo "usage: $0 TPU_NAME ZONE -- COMMAND..." >&2
  exit 2
fi
tpu=$1
zone=$2
shift 3
project_flag=()
if [ -n "${TPU_PROJECT:-}" ]; then project_flag=(--project "$TPU_PROJECT"); fi
root=$(cd "$(dirname "$0")/.." && pwd)
remote_dir='~/facemoe_jax'

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_flag[@]}" --worker=all \
    --command "$1"
}

echo "== copying the checkout (tracked files) to every worker of $tpu"
archive=$(mktemp -t facemoe_code.XXXXXX.tar.gz)
trap 'rm -f "$archive"' EXIT
git -C "$root" ls-files -z | tar -C "$root" --null -T - -czf "$archive"
gcloud compute tpus tpu-vm scp "$archive" "$tpu":facemoe_code.tar.gz --zone "$zone" \
  "${project_flag[@]}" --worker=all
on_all_workers "mkdir -p $remote_dir && tar -xzf facemoe_code.tar.gz -C $remote_dir"

if [ "${TPU_SKIP_INSTALL:-0}" != "1" ]; then
  # The package with its [tpu] extra (jax[tpu]: jaxlib + libtpu), every version held to the pins
  # of requirements.txt (-c: pins only what is installed, so PyTorch/ONNX are left out).
  echo "== installing the package with jax[tpu] at the pinned versions on every worker"
  on_all_workers "cd $remote_dir && ${TPU_PYTHON:-python3} -m venv .venv && .venv/bin/pip install -q -U pip \
    && .venv/bin/pip install -q -c requirements.txt -e '.[tpu]'"
fi

echo "== preflight: same device count on every host, psum over all devices"
on_all_workers "cd $remote_dir && .venv/bin/python -m facemoe_jax.parallel.multihost \
  ${TPU_EXPECTED_DEVICES:-}"

echo "== running on every worker: $*"
quoted=$(printf '%q ' "$@")
on_all_workers "cd $remote_dir && source .venv/bin/activate && $quoted"
