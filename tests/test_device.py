"""trainer/parallel/device.py: deterministic CPU kernels."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The backward of indexing a small learned vector with many repeated ids, as the sales term's bias is
# indexed by each candidate's weekly sales bucket: 512 x 1536 ids into 16 entries. Printed: how many
# different gradients 40 repeats gave, and the gradient.
REPEATS = """
import sys, numpy as np, torch
from trainer.parallel.device import set_determinism
if sys.argv[1] == "on":
    set_determinism(torch.device("cpu"))
g = torch.Generator().manual_seed(0)
idx, up = torch.randint(0, 16, (512, 1536), generator=g), torch.randn(512, 1536, generator=g)
np.save(sys.argv[2] + "/idx.npy", idx.numpy()); np.save(sys.argv[2] + "/up.npy", up.numpy())
grads = set()
for _ in range(40):
    b = torch.zeros(16, requires_grad=True)
    (b[idx] * up).sum().backward()
    grads.add(b.grad.numpy().tobytes())
np.save(sys.argv[2] + "/grad.npy", b.grad.numpy())
print(len(grads))
"""


def repeats(mode: str, tmp_path) -> tuple[int, np.ndarray]:
    out = subprocess.run([sys.executable, "-c", REPEATS, mode, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return int(out.stdout.strip()), np.load(tmp_path / "grad.npy")


def test_cpu_gradients_repeat_bit_for_bit_and_are_the_sums(tmp_path):
    distinct, grad = repeats("on", tmp_path)
    assert distinct == 1
    # the gradient of bias[i] is the sum of the upstream values at the positions holding i (float64 reference)
    idx, up = np.load(tmp_path / "idx.npy").ravel(), np.load(tmp_path / "up.npy").ravel().astype(np.float64)
    ref = np.bincount(idx, weights=up, minlength=16)
    np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-3)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread adds in one order anyway")
def test_without_it_the_threads_add_in_another_order_each_time(tmp_path):
    """What set_determinism is for: the same backward, 40 times, without it."""
    distinct, _ = repeats("off", tmp_path)
    assert distinct > 1
