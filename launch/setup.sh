#!/usr/bin/env bash
# Creates .venv in the repository and installs the pinned version matrix, CPU or GPU variant.
#
#   bash launch/setup.sh            # GPU variant when nvidia-smi sees a GPU, CPU variant otherwise
#   TWOTOWER_VARIANT=cpu bash launch/setup.sh
#
# Idempotent: a stamp records what was installed; a re-run with the same inputs does nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TWOTOWER_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [[ -z "${TWOTOWER_VARIANT:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    TWOTOWER_VARIANT=gpu
  else
    TWOTOWER_VARIANT=cpu
  fi
fi
case "$TWOTOWER_VARIANT" in cpu|gpu) ;; *) echo "TWOTOWER_VARIANT must be cpu or gpu" >&2; exit 2;; esac

STAMP="$VENV/.twotower-setup"
WANT="$TWOTOWER_VARIANT $(cat "$ROOT/pyproject.toml" "$ROOT/launch/setup.sh" | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi

echo "[setup] creating $VENV ($TWOTOWER_VARIANT variant)" >&2
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
# uv installs the matrix: it downloads in parallel and links from its cache, so a fresh clone's set-up
# takes seconds once the cache is warm (pip took a minute and a half here, every time).
"$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q "uv==0.13.10" \
  2> >(grep -v -e 'is ignored: it is neither' >&2)
# --compile-bytecode: as pip does; where PYTHONDONTWRITEBYTECODE is set, every process would otherwise
# compile torch's modules again at start-up (twice the import time, measured).
UV=("$VENV/bin/uv" pip install --python "$VENV/bin/python" -q --compile-bytecode)

"${UV[@]}" "torch==2.14.1"
# torchrec declares a dependency on the CUDA fbgemm-gpu; install it without dependencies and
# add the right fbgemm build ourselves (its other requirements are in pyproject.toml).
if [[ "$TWOTOWER_VARIANT" == gpu ]]; then
  "${UV[@]}" "fbgemm-gpu==1.9.0" "faiss-gpu==1.15.1"
else
  "$VENV/bin/uv" pip uninstall --python "$VENV/bin/python" -q fbgemm-gpu >/dev/null 2>&1 || true
  "${UV[@]}" --no-deps "fbgemm-gpu-cpu==1.9.0"
  "${UV[@]}" "faiss-cpu==1.15.1"
fi
"${UV[@]}" --no-deps "torchrec==1.9.2"
"${UV[@]}" -e "$ROOT[dev]"

# Fail here, not in the middle of a job, if the matrix does not load together.
"$VENV/bin/python" - <<'PY'
import torch, torchrec, fbgemm_gpu, faiss, pyarrow, hydra  # noqa: F401
print(f"[setup] torch {torch.__version__} torchrec {torchrec.__version__} faiss {faiss.__version__} "
      f"pyarrow {pyarrow.__version__} cuda={torch.cuda.is_available()}", flush=True)
PY
echo "$WANT" > "$STAMP"
