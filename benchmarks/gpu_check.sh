#!/usr/bin/env bash
# One prepared GPU check (issue 7): the full CT-CLIP v2 train step in bf16 on one GPU.
#
#   bash benchmarks/gpu_check.sh [PER_DEVICE_BATCH] [extra --gin_param bindings ...]
#
# Runs `python -m benchmarks.train_step` on experiments/configs/ct_clip_v2.gin
# (240 x 480 x 480 volumes, CT-ViT dim 512, 4 + 4 layers, VQ 8192, BERT-base text tower at
# 512 tokens, latent 512) with train.compute_dtype='bfloat16' and a global batch of
# PER_DEVICE_BATCH (default 8) x the number of devices, and prints the benchmark table
# (compile time, step time, volumes/s, TFLOP/s per device, MFU against the table peak,
# peak device memory) and its JSON line.  Budget: under 5 minutes (compile ~1-2 min,
# 1 warm-up + 3 rounds x 3 steps).
#
# Assumption: the machine has python3 >= 3.10.  If `jax` with a GPU backend is not
# importable, it creates .venv-gpu and installs only `pip install -e .` and
# `jax[cuda12]` into it (that needs a reachable package index); nothing else.
set -euo pipefail

cd "$(dirname "$0")/.."
batch_per_device="${1:-8}"
shift || true

python="${PYTHON:-python3}"
if ! "$python" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  if [ ! -x .venv-gpu/bin/python ]; then
    echo "gpu_check: no jax GPU backend in $python; installing into .venv-gpu" >&2
    "$python" -m venv .venv-gpu
    .venv-gpu/bin/pip install --quiet -e . "jax[cuda12]"
  fi
  python=.venv-gpu/bin/python
fi

"$python" - <<'PY'
import jax
print("devices:", jax.devices(), "jax", jax.__version__)
PY
devices="$("$python" -c 'import jax; print(jax.device_count())')"
global_batch=$((batch_per_device * devices))

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

# XLA would otherwise preallocate 75% of the GPU, hiding the real peak.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
exec "$python" -m benchmarks.train_step \
  --gin experiments/configs/ct_clip_v2.gin \
  --gin_param "train.compute_dtype='bfloat16'" \
  --gin_param "train.global_batch_size=${global_batch}" \
  --steps 3 --repeats 3 "$@"
