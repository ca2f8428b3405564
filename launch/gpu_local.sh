#!/usr/bin/env bash
# One GPU workstation: every local GPU in one mesh (FSDP over all of them), bf16 compute with fp32
# master weights, cuDNN attention. Usage: launch/gpu_local.sh HF_MODEL_DIR [--config.KEY=VALUE ...]
set -euo pipefail
HF_PATH=${1:?usage: launch/gpu_local.sh HF_MODEL_DIR [--config.KEY=VALUE ...]}
shift
cd "$(dirname "$0")/.."
exec python -m dcsft_jax.main --config=configs/dcsft.py \
  --config.model.hf_path="$HF_PATH" \
  --config.model.dtype=bfloat16 --config.model.param_dtype=float32 --config.model.attention=auto \
  --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1 \
  --config.workdir="runs/$(basename "$HF_PATH")" "$@"
