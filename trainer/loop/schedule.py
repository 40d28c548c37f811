"""The learning-rate schedule: one factor of the step, applied to both optimisers before each step.

As in torchtitan: a linear warm-up, then a linear or cosine decay to a floor at the run's last step
(``optim.warmup_steps``, ``optim.decay``, ``optim.min_lr_ratio``); or ``plateau``, which lets the
validation decide, as early stopping does: every validation that does not improve on the best so far
multiplies the rates by ``optim.plateau_factor`` (so a run whose length is its early stop still ends on
small rates). The factor scales both base rates, the MLPs' (``optim.lr``, AdamW) and the tables'
(``sharding.fused_lr``). It is a function of the step, the run's length and its validation history
(in the train state) alone, so a resumed run continues the schedule exactly and no scheduler state is
saved. The tables' optimiser runs inside backward (FBGEMM): TorchRec hands it the rate of its param
group when the fused optimiser's ``zero_grad`` (or ``step``) is called, which is what :meth:`apply` does.
"""

from __future__ import annotations

import math


def factor(step: int, total: int, warmup: int, decay: str, min_ratio: float, stalls: int = 0,
           plateau_factor: float = 0.5) -> float:
    """The multiplier of the base rates for 0-based ``step`` of a run of ``total`` steps, after ``stalls``
    validations that did not improve on the best before them."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if decay == "none":
        return 1.0
    if decay == "plateau":
        return max(min_ratio, plateau_factor ** stalls)
    span = total - warmup - 1  # the decay runs from the first step after warm-up to the last step
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup) / span)
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def stalls(validations: list[dict], metric: str) -> int:
    """How many of the validations (in order) did not improve on the best ``metric`` before them."""
    best, count = None, 0
    for v in validations:
        value = v.get(metric)
        if value is None:
            continue
        if best is not None and value <= best:
            count += 1
        best = value if best is None else max(best, value)
    return count


class LRSchedule:
    def __init__(self, optim_cfg, fused_lr: float, dense_optimizer, fused_optimizer, total_steps: int):
        self.warmup, self.decay = int(optim_cfg.warmup_steps), str(optim_cfg.decay)
        self.min_ratio, self.total = float(optim_cfg.min_lr_ratio), int(total_steps)
        self.plateau_factor = float(optim_cfg.plateau_factor)
        if not 0.0 < self.plateau_factor <= 1.0:
            raise ValueError(f"optim.plateau_factor={self.plateau_factor}: expected a share in (0, 1]")
        if self.warmup < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup}: expected >= 0")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_ratio}: expected a share of the base rate in [0, 1]")
        self.fused = fused_optimizer
        both = [(dense_optimizer, float(optim_cfg.lr)), (fused_optimizer, float(fused_lr))]
        self.base = [(opt, lr) for opt, lr in both if opt is not None]  # MF has no MLPs, no AdamW
        self.current = 1.0

    def apply(self, step: int, stalls: int = 0) -> None:
        """Sets both optimisers' rates for ``step`` (0-based: the step about to run), ``stalls`` validations
        so far without a new best."""
        f = factor(step, self.total, self.warmup, self.decay, self.min_ratio, stalls, self.plateau_factor)
        if f == self.current:
            return
        self.current = f
        for opt, base in self.base:
            for group in opt.param_groups:
                group["lr"] = base * f
        self.fused.zero_grad()  # TorchRec's fused optimiser: writes its group's rate into FBGEMM (no grads to zero)

    def lr(self) -> float:
        """The rate now of the MLPs (of the tables for matrix factorisation, which has no MLP)."""
        return self.base[0][1] * self.current
