#!/usr/bin/env bash
# The main job on the embedded default (synthetic "small" preset, or DATA=<preset>): sets up .venv if
# needed, then runs every stage in order and prints the evaluation table. Extra args are Hydra
# overrides every stage accepts (data.*, paths.*); TRAIN_ARGS adds overrides for training only; EPOCHS
# sets the training budget (default: 1 epoch on a CPU, early stopping within trainer.epochs on GPUs).
#   bash launch/run.sh
#   DATA=tiny NPROC=2 TRAIN_ARGS="trainer.epochs=1 loss=hard_negatives" bash launch/run.sh paths.runs=/tmp/runs
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${DATA:-small}"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
# torchrun's grace between its SIGTERM and SIGKILL of the workers: room for the final checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
NPROC="${NPROC:-$(( GPUS > 0 ? GPUS : 2 ))}"  # one process per GPU, else 2 CPU processes (gloo)
# How long to train: on GPUs, or with EPOCHS=N as the budget, the default (validation stops the run within
# trainer.epochs); a CPU demo trains one epoch (about 3 minutes on 2 cores).
if [[ -n "${EPOCHS:-}" ]]; then BUDGET="trainer.epochs=$EPOCHS"; elif (( GPUS == 0 )); then BUDGET="trainer.epochs=1"; else BUDGET=""; fi
step() { echo "[run] $*" >&2; }
step "1/7 synthesise data=$DATA"
"$PY" -m data.synth "data=$DATA" "$@"
step "2/7 prepare (vocabularies, week split, example shards)"
"$PY" -m data.prepare "data=$DATA" "$@"
step "3/7 train on $NPROC process(es)"
# OMP_NUM_THREADS: torchrun's own default (1 per process), set here so it prints no banner about it.
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m trainer.train "data=$DATA" \
  trainer.resume=false ${BUDGET} "$@" ${TRAIN_ARGS:-}
step "4/7 export embeddings"
"$PY" -m trainer.export "data=$DATA" "$@"
step "5/7 build the FAISS index"
"$PY" -m trainer.index "data=$DATA" "$@"
step "6/7 evaluate against baselines"
"$PY" -m trainer.evaluate "data=$DATA" "$@"
step "7/7 the serving bundle (query tower, customers, item vectors, FAISS index)"
"$PY" -m trainer.bundle "data=$DATA" "$@"
