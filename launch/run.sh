#!/usr/bin/env bash
# The main job on the embedded default (synthetic "small" preset, or DATA=<preset>):
# sets up .venv if needed, then runs the pipeline stages in order. Extra args are Hydra overrides
# passed to every stage.
#   bash launch/run.sh
#   DATA=tiny bash launch/run.sh paths.datasets=/scratch/datasets
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${DATA:-small}"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
echo "[run] 1/2 synthesise data=$DATA" >&2
"$PY" -m data.synth "data=$DATA" "$@"
echo "[run] 2/2 prepare data=$DATA (vocabularies, week split, example shards)" >&2
"$PY" -m data.prepare "data=$DATA" "$@"
