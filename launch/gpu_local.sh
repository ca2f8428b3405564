#!/usr/bin/env bash
# One GPU workstation: one process, every local GPU in one mesh (FSDP over all of them: data=1,
# fsdp=-1, tensor=1), bf16 compute with fp32 master weights, cuDNN attention where available.
#
# Usage:
#   launch/gpu_local.sh HF_MODEL_DIR [--config.KEY=VALUE ...]
#   CONFIG='configs/paper/imagenet_qwen25vl_7b.py:data_dir=/data/paper,image_root=/data/dataset/Imagenet=/mnt/imagenet' \
#     WORKDIR=runs/in_7b launch/gpu_local.sh /models/Qwen2.5-VL-7B-Instruct
#
# Environment:
#   CONFIG   the config file, optionally with its argument FILE.py:key=value,... (default configs/dcsft.py)
#   WORKDIR  the run directory (default runs/<basename of HF_MODEL_DIR>); re-running the same command
#            resumes: finished stages are skipped, training restarts from its last Orbax checkpoint.
#   PYTHON   the interpreter (default: python)
# Overrides it needs: the batch sizes (cold_start/finetune/grpo.batch_size, score.batch_size,
# evaluate.batch_size) must be divisible by the number of GPUs (data x fsdp); with 3 or 6 GPUs set
# e.g. --config.mesh.fsdp=2 --config.mesh.tensor=-1. Full fine-tuning (the cold start) of 7B keeps
# ~16 bytes/parameter of weights and Adam state (~133 GB) sharded over the GPUs: use >= 4 x 80 GB,
# or add --config.model.remat=true and --config.cold_start.accum=N when activations do not fit.
set -euo pipefail
HF_PATH=${1:?usage: launch/gpu_local.sh HF_MODEL_DIR [--config.KEY=VALUE ...]}
shift
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/dcsft.py}
WORKDIR=${WORKDIR:-runs/$(basename "$HF_PATH")}
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m dcsft_jax.main --config="$CONFIG" \
  --config.model.hf_path="$HF_PATH" \
  --config.model.dtype=bfloat16 --config.model.param_dtype=float32 --config.model.attention=auto \
  --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1 \
  --config.distributed=off \
  --config.workdir="$WORKDIR" "$@"
