#!/usr/bin/env bash
# One prepared GPU check (issue 7): the full CT-CLIP v2 train step in bf16 on one GPU.
#
#   bash benchmarks/gpu_check.sh [PER_DEVICE_BATCH] [extra benchmarks.train_step flags ...]
#
# Runs `python -m benchmarks.train_step` on experiments/configs/ct_clip_v2.gin
# (240 x 480 x 480 volumes, CT-ViT dim 512, 4 + 4 layers, VQ 8192, BERT-base text tower at
# 512 tokens, latent 512) with train.compute_dtype='bfloat16' and a global batch of
# PER_DEVICE_BATCH (default 8) x the number of devices, and prints the benchmark table
# (compile time, step time, volumes/s, TFLOP/s per device, MFU against the table peak,
# peak device memory) and its JSON line.  Budget: under 5 minutes (compile ~1-2 min,
# 1 warm-up + 3 rounds x 3 steps).
#
# The machine needs python3 >= 3.10 with a GPU-enabled jax.  Machines with no network
# (the lent GPU machines of this project's sandbox) lack the project's pure-data
# dependencies; put their wheels in `.whl/` at the repository root (docs/scaling.md,
# "GPU check", gives the one `pip download` command) and this script installs them
# into /tmp/ct_rate_site first.  `.whl/ours/` holds the flax/optax/orbax versions the
# project is tested with; they are used only when the machine's own flax cannot import
# the project.
set -euo pipefail

cd "$(dirname "$0")/.."
batch_per_device="${1:-8}"
shift || true
python="${PYTHON:-python3}"

if [ -d .whl ] && ! "$python" -c 'import grain, gin' 2>/dev/null; then
  site=/tmp/ct_rate_site
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
  if ! "$python" -c 'import experiments.pretrain' 2>/tmp/ct_rate_import.log; then
    echo "gpu_check: the machine's flax/optax/orbax cannot import the project" \
      "($(tail -1 /tmp/ct_rate_import.log)); using .whl/ours" >&2
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" .whl/ours/*.whl
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$python" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  echo "gpu_check: $python has no jax GPU backend; install jax[cuda12] (or cuda13) first" >&2
  exit 1
fi

"$python" - <<'PY'
import flax, jax
print("devices:", jax.devices(), "jax", jax.__version__, "flax", flax.__version__)
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
