#!/usr/bin/env bash
# Pretraining on a Cloud TPU VM slice: every worker (host) runs the same command and
# `experiments.pretrain` joins them through jax.distributed (TPU workers are detected
# from the metadata server; no flags needed).  See docs/scaling.md.
#
#   scripts/tpu/tpu.sh [--dry-run] create | install | train | logs | status | stop | delete
#
# Settings (environment variables, defaults in brackets):
#   TPU_NAME [ct-clip]   ZONE [us-east5-a]   ACCELERATOR [v5p-32]   RUNTIME [v2-alpha-tpuv5]
#   PROJECT [gcloud's default]   SPOT [0; 1 = preemptible capacity, resumed by rerunning train]
#   BUCKET [none; mounted with gcsfuse at /gcs/$BUCKET on every worker by `install`]
#   GIN [experiments/configs/ct_clip_v2.gin]   WORKDIR [/gcs/$BUCKET/runs/$TPU_NAME]
#   TRAIN_ARGS [extra arguments, e.g. "--gin_param train.train_data='/gcs/b/shards/train'"]
#   REMOTE_DIR [ct-rate-jax: where the code goes in each worker's home]
# --dry-run (or DRY_RUN=1) prints the commands instead of running them.
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
COMMAND="${1:-}"

TPU_NAME="${TPU_NAME:-ct-clip}"
ZONE="${ZONE:-us-east5-a}"
ACCELERATOR="${ACCELERATOR:-v5p-32}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"
PROJECT="${PROJECT:-}"
SPOT="${SPOT:-0}"
BUCKET="${BUCKET:-}"
GIN="${GIN:-experiments/configs/ct_clip_v2.gin}"
WORKDIR="${WORKDIR:-/gcs/${BUCKET:-BUCKET}/runs/${TPU_NAME}}"
TRAIN_ARGS="${TRAIN_ARGS:-}"
REMOTE_DIR="${REMOTE_DIR:-ct-rate-jax}"
LOG_FILE="${LOG_FILE:-train.log}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# One argument as the shell would need it typed: plain, or in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command (quoted, so it can be pasted into a shell) or runs it.
run() {
  if [[ "$DRY_RUN" == "1" ]]; then
    local first=1 arg
    for arg in "$@"; do
      if [[ "$first" == "0" ]]; then
        printf ' '
      fi
      quote "$arg"
      first=0
    done
    printf '\n'
  else
    "$@"
  fi
}

gcloud_tpu() {
  local extra=()
  if [[ -n "$PROJECT" ]]; then
    extra+=(--project "$PROJECT")
  fi
  run gcloud compute tpus tpu-vm "$@" --zone "$ZONE" "${extra[@]}"
}

# The same shell command on every worker of the slice, at the same time.
on_all_workers() {
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command "$1"
}

case "$COMMAND" in
  create)
    args=(create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME")
    if [[ "$SPOT" == "1" ]]; then
      args+=(--spot)
    fi
    gcloud_tpu "${args[@]}"
    ;;
  install)
    # The working tree's committed code, copied to every worker, installed with TPU jax.
    archive="/tmp/${TPU_NAME}-code.tar.gz"
    run git -C "$REPO_ROOT" archive --format=tar.gz -o "$archive" HEAD
    gcloud_tpu scp "$archive" "$TPU_NAME:code.tar.gz" --worker=all
    setup="mkdir -p $REMOTE_DIR && tar -xzf code.tar.gz -C $REMOTE_DIR"
    setup+=" && python3 -m pip install -U pip && python3 -m pip install -e ./$REMOTE_DIR 'jax[tpu]'"
    if [[ -n "$BUCKET" ]]; then
      # Data and checkpoints live in the bucket; every worker sees it at the same path.
      setup+=" && (command -v gcsfuse >/dev/null || (sudo apt-get update && sudo apt-get install -y gcsfuse))"
      setup+=" && sudo mkdir -p /gcs/$BUCKET && sudo chown \$USER /gcs/$BUCKET"
      setup+=" && (mountpoint -q /gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET /gcs/$BUCKET)"
    fi
    on_all_workers "$setup"
    ;;
  train)
    # Detached, so that the ssh session can end; rerunning resumes from the newest
    # checkpoint in WORKDIR (e.g. after a spot preemption and `create`).
    train="cd $REMOTE_DIR && nohup python3 -m experiments.pretrain --gin $GIN --workdir $WORKDIR"
    if [[ -n "$TRAIN_ARGS" ]]; then
      train+=" $TRAIN_ARGS"
    fi
    train+=" > ~/$LOG_FILE 2>&1 & echo \$! > ~/train.pid"
    on_all_workers "$train"
    ;;
  logs)
    # Process 0 prints the progress bar and metrics; other workers only errors.
    gcloud_tpu ssh "$TPU_NAME" --worker="${WORKER:-0}" --command "tail -n 100 -f ~/$LOG_FILE"
    ;;
  status)
    gcloud_tpu describe "$TPU_NAME"
    ;;
  stop)
    # SIGTERM: the run finishes its step, writes a checkpoint and exits 0 on every worker.
    on_all_workers "kill -TERM \$(cat ~/train.pid)"
    ;;
  delete)
    gcloud_tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    echo "usage: $0 [--dry-run] create|install|train|logs|status|stop|delete" >&2
    exit 2
    ;;
esac
