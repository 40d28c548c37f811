"""Settings that depend on the device: how many loader processes feed it, and matmul precision.

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
