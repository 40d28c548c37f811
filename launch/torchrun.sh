#!/usr/bin/env bash
# Single-node training under torchrun: one process per GPU (1..8), or NPROC CPU processes (gloo).
# Hydra overrides pass through; the run directory is derived from them (RUN_DIR overrides it), so
# running the same command again resumes from its newest checkpoint.
#
#   bash launch/torchrun.sh data=small
#   NPROC=4 bash launch/torchrun.sh data=small loss=hard_negatives trainer.epochs=3
#   RUN_DIR=/scratch/runs/exp1 bash launch/torchrun.sh data=hm_scale
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
# torchrun's grace between its SIGTERM and SIGKILL of the workers: room for the final checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}"
NPROC="${NPROC:-$("$PY" -c 'import torch; print(torch.cuda.device_count() or 2)')}"
if [[ -z "${RUN_DIR:-}" ]]; then
  data="small"; runs="runs"
  for a in "$@"; do
    [[ "$a" == data=* ]] && data="${a#data=}"
    [[ "$a" == paths.runs=* ]] && runs="${a#paths.runs=}"
  done
  # Name the run by the overrides that define it (not by paths or display switches).
  tag="$(printf '%s\n' "$@" | grep -v -E '^(data|paths\.[a-z]+|prepare\.out|trainer\.progress|hydra\.[a-z.]+)=' \
        | LC_ALL=C sort | tr '\n' '+' | sed 's/+$//; s/[^A-Za-z0-9._+-]/-/g')"  # no '=' or ',': Hydra syntax
  RUN_DIR="$runs/$data/train${tag:+-$tag}"
fi
echo "[torchrun] $NPROC process(es), run dir $RUN_DIR" >&2
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m trainer.train \
  "hydra.run.dir=$RUN_DIR" "$@"
