#!/usr/bin/env bash
# GPU cluster under SLURM: one JAX process per node (seeing all its GPUs) or per GPU.
#
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/slurm_gpu.sh \
#       python -m facemoe_jax.main --config configs/vit_b_moe.py --workdir /shared/runs/vitb \
#       --config.mesh.expert=8
#   # one process per GPU instead:
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-task=1 launch/slurm_gpu.sh python -m ...
#
# jax.distributed reads SLURM's node list, task count and rank (facemoe_jax/parallel/multihost.py),
# so the command is the same on every task. The workdir must be on a filesystem all nodes share
# (checkpoints are written by every process, summaries by process 0). Before training, a
# preflight step checks that every task sees the same number of devices and that a psum over all
# of them returns that number. Set FACEMOE_VENV to a virtual environment with requirements.txt
# and a CUDA build of jax (pip install "jax[cuda12]==<the pinned version>").
#SBATCH --job-name=facemoe
#SBATCH --output=facemoe-%j.log
#SBATCH --exclusive
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: sbatch [options] $0 COMMAND..." >&2
  exit 2
fi
if [ -n "${FACEMOE_VENV:-}" ]; then
  # shellcheck disable=SC1091
  source "$FACEMOE_VENV/bin/activate"
fi
cd "${SLURM_SUBMIT_DIR:-.}"

# Preflight: all tasks, same device count, working collectives; --label prefixes each line.
srun --label --kill-on-bad-exit=1 python -m facemoe_jax.parallel.multihost
srun --label --kill-on-bad-exit=1 "$@"
