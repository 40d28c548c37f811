"""Why a run stops early: a stop signal (preemption, a time limit near), or a non-finite loss.

Both are decided by all ranks together (a collective), so every rank stops at the same step and the
checkpoint they write together is consistent. Neither forces a host-device sync per step: the
non-finite check keeps the first bad step on the device and looks at it when the loop asks.
"""

from __future__ import annotations

import os
import signal

import torch

from trainer.parallel import distributed as D

MARKER = "PREEMPTED"


class StopRequested(Exception):
    """Raised inside long phases (validation, miner refresh) when the ranks agreed to stop."""


class NonFiniteLoss(RuntimeError):
    pass


class StopSignal:
    """SIGTERM (Slurm preemption, torchrun's shutdown) and SIGUSR1 (``--signal`` before the time limit)."""

    def __init__(self):
        self.signum = 0
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def close(self) -> None:
        """Gives the signals back to whoever handled them before (matters when a process trains twice)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, _frame) -> None:
        self.signum = signum

    def requested(self) -> bool:
        """Whether any rank got a stop signal (a collective: call it at the same points on every rank)."""
        return D.any_rank(self.signum)

    def check(self) -> None:
        if self.requested():
            raise StopRequested()


def clear_marker(run_dir: str) -> None:
    """A run that starts clears the last run's marker: only a stop of *this* run may requeue the job."""
    if D.rank() == 0:
        try:
            os.remove(os.path.join(run_dir, MARKER))
        except FileNotFoundError:
            pass


def write_marker(run_dir: str, step: int) -> None:
    if D.rank() == 0:
        tmp = os.path.join(run_dir, MARKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{step}\n")
        os.replace(tmp, os.path.join(run_dir, MARKER))


class FiniteGuard:
    """Remembers, on the device, the first step whose loss was not finite."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((1,), -1, dtype=torch.int64, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()).reshape(1)
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step),
                                     self.first_bad)

    def check(self) -> None:
        """Raises on every rank if any rank saw a non-finite loss (the smallest such step is named)."""
        big = torch.iinfo(torch.int64).max
        mine = torch.where(self.first_bad < 0, torch.full_like(self.first_bad, big), self.first_bad)
        first = int(D.all_reduce(mine, torch.distributed.ReduceOp.MIN).item())
        if first != big:
            raise NonFiniteLoss(f"the loss was not finite at step {first} (on at least one rank); stopped "
                                "without writing a checkpoint of the diverged weights. Lower the learning "
                                "rates or look at the data of that step; the newest checkpoint is still "
                                "the last good one")


def weights_finite(model: torch.nn.Module) -> bool:
    """Whether every rank's parameters (its shards of the tables) are finite."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    ok = True
    for v in model.state_dict().values():
        tensors = [s.tensor for s in v.local_shards()] if isinstance(v, ShardedTensor) else [v]
        ok = ok and all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
    return D.every_rank(ok)
