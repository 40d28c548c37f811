"""torch.compile for the dense part of the training step (``trainer.compile``).

What is compiled: the model's dense modules, each in place (``nn.Module.compile``: parameter names and
checkpoints unchanged, DDP's gradient hooks as before): the history encoder, both towers and the scoring
terms' heads. What is not: TorchRec's sharded lookups (FBGEMM kernels already, with their own input and
output distribution between the ranks) and the loss, whose candidate gathers are collectives.

``auto`` compiles on CUDA, where a step of the default model is many small kernels and inductor's fused
Triton kernels cut the launches; on a CPU it stays eager: measured on 2 cores (bench/train.py, README
"Speed of the step on a CPU") the compiled encoder and towers ran no faster than eager, and the compile
costs ~30 s a process.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import Compile


def wanted(mode: str, device: torch.device) -> bool:
    mode = Compile(str(mode))
    return mode == Compile.on or (mode == Compile.auto and device.type == "cuda")


def dense_modules(model) -> dict[str, nn.Module]:
    """The TwoTower's modules that ``compile_dense`` compiles, by name (absent ones left out)."""
    named = {"sequence": model.sequence, "query_tower": model.query_tower, "item_tower": model.item_tower}
    if model.repeats is not None and model.repeats.level is not None:
        named["repeats.level"] = model.repeats.level
    return {k: m for k, m in named.items() if m is not None and not isinstance(m, nn.Identity)}


def compile_dense(model) -> list[str]:
    """Compiles the dense modules of the TwoTower ``model`` in place; returns their names. Sizes are
    symbolic from the start (``dynamic=True``): one compile serves every batch size (a short last batch,
    validation's batches, another world size's per-rank batch), and inductor's on-disk cache of it
    serves the next process, where static sizes would compile again for each."""
    for module in dense_modules(model).values():
        module.compile(dynamic=True)
    return list(dense_modules(model))


def apply(mode: str, model, device: torch.device) -> list[str]:
    """``trainer.compile`` for the TwoTower ``model`` on ``device``: the names compiled (none: eager). Under
    ``auto`` a module whose compile fails (no C compiler for Triton's launcher, an operator inductor cannot
    lower) runs eager with dynamo's warning instead of stopping the run; ``on`` lets it fail."""
    if not wanted(mode, device):
        return []
    if Compile(str(mode)) == Compile.auto:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
    return compile_dense(model)
