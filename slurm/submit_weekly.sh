#!/usr/bin/env bash
# The weekly chain (launch/weekly.py) as three dependent jobs (afterok): the week's data (ingest, prepare
# grown from the last published week), training (slurm/train.sbatch: multi-node, requeued on preemption,
# warm-started from the last published week), then export, index, evaluate, bundle and publish.
#
#   bash slurm/submit_weekly.sh --chain runs/weekly --drop datasets/hm-drops/2020-09-22 data=hm
#   TRAIN_SBATCH="--nodes=2 --gpus-per-node=8" bash slurm/submit_weekly.sh --chain runs/weekly --drop ... data=hm
# Arguments are launch/weekly.py's (--chain, --drop or --raw, --week, --window-days, --train-args, Hydra
# overrides). The parent week is the last one published when this is submitted. Every job skips what is
# done, so submitting the same week again resumes it. STAGE_SBATCH / TRAIN_SBATCH: extra sbatch options.
# Prints the job ids, first to last.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${TWOTOWER_PYTHON:-$ROOT/.venv/bin/python}"
submit() { sbatch --parsable "$@"; }
name="${PIPELINE_NAME:-twotower-weekly}"
mapfile -t plan < <("$PY" -m launch.weekly "$@" --print-train)
run_dir="${plan[0]}"
data=$(submit --job-name="$name-data" ${STAGE_SBATCH:-} slurm/stage.sbatch launch.weekly "$@" --stages ingest,prepare)
train=$(submit --job-name="$name-train" --dependency="afterok:$data" --export=ALL,RUN_DIR="$run_dir" \
  ${TRAIN_SBATCH:-} slurm/train.sbatch "${plan[@]:1}")
rest=$(submit --job-name="$name-publish" --dependency="afterok:$train" ${STAGE_SBATCH:-} slurm/stage.sbatch \
  launch.weekly "$@" --stages export,index,evaluate,bundle,publish)
echo "$data $train $rest"
