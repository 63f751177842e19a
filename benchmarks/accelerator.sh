#!/usr/bin/env bash
# The first command on a machine with an accelerator (and, at small sizes, on any CPU):
#
#   bash benchmarks/accelerator.sh [benchmarks.accelerator flags, e.g. --steps 10]
#
# 1. With an NVIDIA GPU (nvidia-smi answers) and no GPU backend in JAX yet, installs JAX's CUDA
#    plugin at the installed JAX's exact version: `pip install "jax[cuda12]==<version>"`. On a
#    machine without internet, point pip at a wheel folder: PIP_FIND_LINKS=DIR PIP_NO_INDEX=1.
# 2. Prints the devices, then runs benchmarks/accelerator.py: the demo, the ViT-B-MoE and
#    Swin-MoE train steps in bf16 with MFU against their PyTorch twins, embedding throughput,
#    and one JSON line at the end.
# The whole run is bounded by ACCELERATOR_TIMEOUT seconds (default 570: under 10 minutes).
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -c "import jax" 2>/dev/null || {
  echo "accelerator.sh: $PYTHON cannot import jax; install requirements.txt first" >&2
  exit 2
}
JAX_VERSION=$("$PYTHON" -c "import jax; print(jax.__version__)")

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  nvidia-smi -L
  if ! "$PYTHON" -c "import jax, sys; sys.exit(0 if jax.devices('gpu') else 1)" 2>/dev/null; then
    echo "installing JAX's CUDA plugin for jax==$JAX_VERSION"
    "$PYTHON" -m pip install --quiet "jax[cuda12]==$JAX_VERSION" || {
      echo "accelerator.sh: pip could not install jax[cuda12]==$JAX_VERSION" \
        "(offline? set PIP_FIND_LINKS to a folder of its wheels and PIP_NO_INDEX=1)" >&2
      exit 3
    }
  fi
  # JAX and the PyTorch twin run in separate processes; let neither hold the other's memory.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
fi

"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())"
exec timeout --kill-after=10 "${ACCELERATOR_TIMEOUT:-570}" \
  "$PYTHON" -m benchmarks.accelerator "$@"
