#!/usr/bin/env bash
# A Cloud TPU VM pod slice: create it, install the project on every worker, run the pipeline on every
# worker at once (one process per host; jax.distributed.initialize() finds the other hosts itself
# from the TPU metadata), delete it.
#
# Usage:
#   launch/tpu_pod.sh create                      # the TPU VM slice
#   launch/tpu_pod.sh setup                       # repo + the package with jax[tpu] + shared mount, all workers
#   launch/tpu_pod.sh run [--config.KEY=VALUE ...]  # the pipeline on all workers (re-run it to resume)
#   launch/tpu_pod.sh ssh 'COMMAND'               # any command on all workers (e.g. 'tail -n 20 ~/dcsft.log')
#   launch/tpu_pod.sh delete
#   launch/tpu_pod.sh all [--config.KEY=VALUE ...]  # create, setup, run
#
# Variables (environment; defaults in brackets):
#   TPU_NAME [dcsft-pod]  ZONE [us-east5-a]  PROJECT [gcloud's default]
#   ACCELERATOR_TYPE [v5p-32: 16 chips, 4 hosts]  RUNTIME_VERSION [v2-alpha-tpuv5]
#   SPOT [0] (1: a Spot slice, which can be preempted; `run` again resumes)
#   REPO_URL  git URL to clone on every worker; empty = copy this checkout with `tpu-vm scp` (slower)
#   REPO_DIR [~/dcsft_jax] where the repo lives on every worker
#   SHARED [/mnt/shared] a path every host must see (the workdir, data and the HF model live under it):
#     NFS_SOURCE (e.g. 10.0.0.2:/share, a Filestore instance) is mounted there by `setup`, or
#     GCS_BUCKET (a bucket name) is mounted there with gcsfuse; neither = SHARED must already exist on
#     every worker (then it is NOT shared: fine for one host only).
#   CONFIG [configs/paper/imagenet_qwen25vl_7b.py:data_dir=$SHARED/paper_data,hf_path=$SHARED/models/Qwen2.5-VL-7B-Instruct,workdir=$SHARED/runs/imagenet_7b]
#   MESH [--config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1]
#   DETACH [1] run under nohup on each worker (log ~/dcsft.log) so a dropped ssh does not kill the run;
#     0 = stream every worker's output here.
#
# Why a shared filesystem: the stages write their outputs (scores, curated JSON, evaluation results,
# stages.json, HF export) with plain Python file IO from process 0, and every host then reads them
# back through the same path; Orbax checkpoints (trainer and model directories) are written by every
# host into the same directory. Our code opens workdir paths with open()/os.replace, so a gs:// URL
# does not work as the workdir: mount one instead (Filestore/NFS preferred; gcsfuse works but its
# renames are copies, not atomic). The batch sizes must be divisible by data x fsdp: v5p-32 has 16
# chips, so the paper's batch 16 fits fsdp=16; on 32+ chips use e.g. MESH='--config.mesh.data=1
# --config.mesh.fsdp=16 --config.mesh.tensor=-1'.
set -euo pipefail
cd "$(dirname "$0")/.."

TPU_NAME=${TPU_NAME:-dcsft-pod}
ZONE=${ZONE:-us-east5-a}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5}
SPOT=${SPOT:-0}
REPO_URL=${REPO_URL:-}
REPO_DIR=${REPO_DIR:-'~/dcsft_jax'}
SHARED=${SHARED:-/mnt/shared}
NFS_SOURCE=${NFS_SOURCE:-}
GCS_BUCKET=${GCS_BUCKET:-}
CONFIG=${CONFIG:-"configs/paper/imagenet_qwen25vl_7b.py:data_dir=$SHARED/paper_data,hf_path=$SHARED/models/Qwen2.5-VL-7B-Instruct,workdir=$SHARED/runs/imagenet_7b"}
MESH=${MESH:-"--config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1"}
DETACH=${DETACH:-1}

GC=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then WHERE+=(--project="$PROJECT"); fi

on_all() {  # on_all 'COMMAND': run a shell command on every worker of the slice
  "${GC[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$1"
}

quote_args() {  # the arguments, shell-quoted, as one string for the remote command line
  local out="" a
  for a in "$@"; do out+=" $(printf '%q' "$a")"; done
  printf '%s' "$out"
}

create() {
  local extra=()
  if [[ "$SPOT" == 1 ]]; then extra+=(--spot); fi
  "${GC[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"}
}

setup() {
  if [[ -n "$REPO_URL" ]]; then
    on_all "set -e; if [ -d $REPO_DIR/.git ]; then git -C $REPO_DIR pull --ff-only; else git clone $(printf '%q' "$REPO_URL") $REPO_DIR; fi"
  else
    # Copy this checkout (tracked and untracked files, without .git, venvs or workdirs).
    local tarball
    tarball=$(mktemp /tmp/dcsft_jax.XXXXXX.tar.gz)
    tar --exclude=.git --exclude=.venv --exclude=workdir --exclude=runs -czf "$tarball" .
    "${GC[@]}" scp "$tarball" "$TPU_NAME:/tmp/dcsft_jax.tar.gz" "${WHERE[@]}" --worker=all
    rm -f "$tarball"
    on_all "set -e; mkdir -p $REPO_DIR; tar -xzf /tmp/dcsft_jax.tar.gz -C $REPO_DIR"
  fi
  on_all "set -e; cd $REPO_DIR; python3 -m pip install -q -U pip; python3 -m pip install -q '.[tpu,all]'"
  if [[ -n "$NFS_SOURCE" ]]; then
    on_all "set -e; sudo mkdir -p $SHARED; mountpoint -q $SHARED || { sudo apt-get -qq update && sudo apt-get -qq install -y nfs-common && sudo mount -t nfs -o rw,hard $NFS_SOURCE $SHARED; }; sudo chmod a+rwx $SHARED"
  elif [[ -n "$GCS_BUCKET" ]]; then
    # gcsfuse from Google's apt repository (see cloud.google.com/storage/docs/gcsfuse-install).
    on_all "set -e; sudo mkdir -p $SHARED; sudo chmod a+rwx $SHARED; mountpoint -q $SHARED || { command -v gcsfuse >/dev/null || { echo 'install gcsfuse on the workers first' >&2; exit 1; }; gcsfuse --implicit-dirs $GCS_BUCKET $SHARED; }"
  fi
  on_all "set -e; cd $REPO_DIR; python3 -c 'import jax; print(jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)'"
}

run() {
  # distributed=on: every worker calls jax.distributed.initialize(), which reads the slice's hosts
  # from the TPU metadata; process 0 writes the shared outputs, every host reads and checkpoints.
  local cmd
  cmd="cd $REPO_DIR && python3 -m dcsft_jax.main --config=$(printf '%q' "$CONFIG") $MESH"
  cmd+=" --config.distributed=on --config.model.dtype=bfloat16 --config.model.param_dtype=float32$(quote_args "$@")"
  if [[ "$DETACH" == 1 ]]; then
    on_all "nohup bash -c $(printf '%q' "$cmd") > ~/dcsft.log 2>&1 < /dev/null & echo \"\$(hostname): started, log ~/dcsft.log\""
  else
    on_all "$cmd"
  fi
}

action=${1:-}
if [[ $# -gt 0 ]]; then shift; fi
case "$action" in
  create) create ;;
  setup) setup ;;
  run) run "$@" ;;
  ssh) on_all "${1:?usage: launch/tpu_pod.sh ssh 'COMMAND'}" ;;
  delete) "${GC[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet ;;
  all) create; setup; run "$@" ;;
  *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
