#!/usr/bin/env bash
# The test command: sets up .venv if needed (CPU or GPU variant), then runs the whole suite.
#   bash launch/test.sh [pytest args]
#   TEST_WORKERS=1 bash launch/test.sh   # one process, in collection order
# The suite runs on pytest-xdist workers, one per core up to 4: most tests wait on process start-ups
# (imports, torchrun, stages), which leave a core idle on their own; the Slurm tests share one worker.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
WORKERS=(-n "${TEST_WORKERS:-auto}" --maxprocesses=4 --dist loadgroup)
[[ "${TEST_WORKERS:-}" == 1 ]] && WORKERS=(-p no:xdist)
exec "$ROOT/.venv/bin/python" -m pytest "${WORKERS[@]}" "$@"
