#!/usr/bin/env bash
# The test command: sets up .venv if needed (CPU or GPU variant), then runs the whole suite.
#   bash launch/test.sh [pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
