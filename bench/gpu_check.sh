#!/usr/bin/env bash
# The GPU measurements of the training step, as one command on a GPU machine set up by the GPU kit
# (../shared/gpu/README.md: two set-up calls, then this from the project root, 10 minutes at most):
#   bash bench/gpu_check.sh            # writes under $OUT (or /tmp/gpu-check)
# 1. the gpu-marked tests; 2. bench/train.py at batch 16384 on data=small for the default, the bag
# history, bf16 and mined hard negatives, each eager and compiled side by side, with GPU utilisation
# and peak memory; 3. a torch.profiler trace (eager and compiled default) and its top operators.
set -euo pipefail
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
source /root/gpu-site/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
[[ -d datasets/small ]] || { python3 -m data.synth data=small && python3 -m data.prepare data=small; } > "$OUT/data.log" 2>&1
python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest.txt"
python3 bench/train.py --data small --device cuda --batch 16384 --configs default bag bf16 hard_negatives \
  --compile both --no-pipelined --rounds 3 --phase-seconds 3 --profile "$OUT/profile" 2>&1 \
  | grep -v -i -E "warn|sharding spec" | tee "$OUT/bench.txt"
