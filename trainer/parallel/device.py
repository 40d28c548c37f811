"""Settings that depend on the device: how many loader processes feed it, matmul precision, deterministic
kernels.

(Kept out of trainer/train.py on purpose: when that module runs as ``__main__``, a Hydra submitit sweep
pickles its functions by value, and torch.backends.cudnn cannot be pickled.)
"""

from __future__ import annotations

import os

import torch


def loader_workers(configured: int, device: torch.device) -> int:
    """``trainer.num_workers``, with 0 meaning: in-process on the CPU (the training threads are busy),
    4 loader processes per GPU when the host has the cores for them."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return 1
    per_rank = (os.cpu_count() or 2) // max(1, torch.cuda.device_count())
    return max(1, min(4, per_rank - 2))


def set_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Applies ``trainer.precision``; returns the autocast dtype for the towers and logits (or None)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision in ("tf32", "bf16")
        torch.backends.cudnn.allow_tf32 = precision in ("tf32", "bf16")
    return torch.bfloat16 if precision == "bf16" else None


def set_determinism(device: torch.device) -> None:
    """On a CPU, ATen's deterministic kernels, so that a run repeats bit for bit. Without them the
    backward of indexing a small learned vector with many repeated ids (the sales and buying-again
    terms' biases) is a parallel ``index_put`` that adds the threads' floats in whatever order they
    come: one process with 2 threads trained another model on each run of the same command (3 outcomes
    in 6 runs of the debug preset, up to 1.9% of the weights' norm apart after 50 steps), enough to
    hide a real difference between two runs. The serial kernels cost nothing measurable on a CPU. On a
    GPU this is left as it was (the deterministic CUDA kernels' cost is unmeasured)."""
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
