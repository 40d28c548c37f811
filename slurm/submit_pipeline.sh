#!/usr/bin/env bash
# Submits the whole pipeline as a chain of dependent jobs (afterok):
#   prepare -> train (multi-node) -> export -> index -> evaluate
#
#   bash slurm/submit_pipeline.sh data=hm_scale          # overrides every stage accepts (data.*, paths.*)
#   TRAIN_SBATCH="--nodes=4 --gpus-per-node=8" TRAIN_ARGS="trainer.epochs=3" bash slurm/submit_pipeline.sh data=hm_scale
# STAGE_SBATCH / TRAIN_SBATCH: extra sbatch options; TRAIN_ARGS: Hydra overrides for training only.
# Prints the job ids, first to last.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
submit() { sbatch --parsable "$@"; }
name="${PIPELINE_NAME:-twotower}"
RUN_DIR="${RUN_DIR:-runs/slurm/$name}"
prep=$(submit --job-name="$name-prepare" ${STAGE_SBATCH:-} slurm/stage.sbatch data.prepare "$@")
train=$(RUN_DIR="$RUN_DIR" submit --job-name="$name-train" --dependency="afterok:$prep" --export=ALL,RUN_DIR="$RUN_DIR" \
  ${TRAIN_SBATCH:-} slurm/train.sbatch "$@" ${TRAIN_ARGS:-})
export_=$(submit --job-name="$name-export" --dependency="afterok:$train" ${STAGE_SBATCH:-} slurm/stage.sbatch \
  trainer.export "train_dir=$RUN_DIR" "hydra.run.dir=$RUN_DIR-export" "$@")
index=$(submit --job-name="$name-index" --dependency="afterok:$export_" ${STAGE_SBATCH:-} slurm/stage.sbatch \
  trainer.index "export_dir=$RUN_DIR-export" "hydra.run.dir=$RUN_DIR-index" "$@")
evaluate=$(submit --job-name="$name-evaluate" --dependency="afterok:$index" ${STAGE_SBATCH:-} slurm/stage.sbatch \
  trainer.evaluate "export_dir=$RUN_DIR-export" "index_dir=$RUN_DIR-index" "hydra.run.dir=$RUN_DIR-evaluate" "$@")
echo "$prep $train $export_ $index $evaluate"
