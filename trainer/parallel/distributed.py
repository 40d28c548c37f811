"""Process group, device choice, and the collectives every other module uses.

nccl takes CUDA tensors only ("No backend type associated with device type cpu"), gloo takes CPU
tensors. Every flag, count, size or id that crosses ranks goes through the helpers here: they move it
to the group's device and hand the result back on the caller's device. Nothing else in the project
calls ``torch.distributed`` collectives directly; with ``TWOTOWER_CHECK_COLLECTIVES=1`` (the tests set
it) a direct call from project code is an error, so a CPU-only gloo run catches what would break nccl.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
CHECK_ENV = "TWOTOWER_CHECK_COLLECTIVES"
_PROJECT = pathlib.Path(__file__).resolve().parents[2]  # the repository (this file is trainer/parallel/distributed.py)
_THIS = pathlib.Path(__file__).resolve()


@dataclass(frozen=True)
class Dist:
    device: torch.device
    rank: int
    world: int


def choose_device(device: str, local_rank: int, local_world: int) -> torch.device:
    """``cpu``; ``cuda`` (an error without a GPU for this local rank); ``auto``: CUDA when every local
    rank has a GPU of its own, CPU when there is none, and an error when the processes outnumber the
    GPUs (a silent fall-back to CPU would make a GPU job crawl)."""
    if device == "cpu":
        return torch.device("cpu")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        if device == "cuda":
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible")
        return torch.device("cpu")
    if local_world > n or local_rank >= n:
        raise RuntimeError(
            f"trainer.device={device}: {local_world} processes on this node but {n} GPU(s) visible; start "
            f"--nproc_per_node={n}, or run on the CPU with trainer.device=cpu (or CUDA_VISIBLE_DEVICES=)")
    return torch.device(f"cuda:{local_rank}")


def init(device: str = "auto", backend: str = "auto") -> Dist:
    """Joins (or starts) the process group: nccl on CUDA, gloo on CPU; one process without torchrun."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = choose_device(device, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    chosen = str(backend) if backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    if chosen == "nccl" and dev.type != "cuda":
        raise RuntimeError("trainer.backend=nccl needs CUDA; use gloo (or auto) on the CPU")
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:  # torchrun
            dist.init_process_group(chosen)
        else:  # one process (a plain run, a submitit sweep job): no port to collide on
            store = tempfile.NamedTemporaryFile(prefix="twotower-pg-", delete=False).name
            os.remove(store)
            dist.init_process_group(chosen, init_method=f"file://{store}", rank=0, world_size=1)
    if os.environ.get(CHECK_ENV) == "1":
        check_collectives()
    return Dist(dev, dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def comm_device() -> torch.device:
    """Where tensors must be for the default group's collectives."""
    if dist.is_initialized() and "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier(device_ids=[torch.cuda.current_device()] if comm_device().type == "cuda" else None)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A reduced copy of ``t`` on ``t``'s device."""
    if world_size() == 1:
        return t.clone()
    x = t.detach().to(comm_device()).clone()
    dist.all_reduce(x, op=op)
    return x.to(t.device)


def any_rank(flag) -> bool:
    """Whether ``flag`` is set on any rank (every rank gets the same answer)."""
    return bool(all_reduce(torch.tensor([int(flag)], dtype=torch.int64), dist.ReduceOp.MAX).item())


def every_rank(flag) -> bool:
    return bool(all_reduce(torch.tensor([int(bool(flag))], dtype=torch.int64), dist.ReduceOp.MIN).item())


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape everywhere), on ``t``'s device."""
    if world_size() == 1:
        return [t]
    x = t.detach().to(comm_device()).contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return [p.to(t.device) for p in parts]


def all_gather_rows(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Rows of every rank's ``t`` concatenated in rank order; row counts may differ between ranks
    (``sizes``: the counts when the caller knows them, which saves an exchange)."""
    if world_size() == 1:
        return t
    if sizes is None:
        sizes = [int(s) for s in all_gather(torch.tensor([t.shape[0]], dtype=torch.int64))]
    pad = t.new_zeros((max(sizes) - t.shape[0], *t.shape[1:]))
    parts = all_gather(torch.cat([t, pad]))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def all_gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Rows of every rank's ``x`` concatenated in rank order, differentiable: the gradient of the result
    reaches every rank's ``x`` summed over all ranks, as it would if one process held the whole batch
    (each rank's loss touches the other ranks' rows too). ``sizes``: every rank's row count, when they
    differ (known to the caller: no exchange, no host sync). Returns the tensor and the index of this
    rank's first row in it."""
    if world_size() == 1:
        return x, 0
    sizes = list(sizes) if sizes is not None else [x.shape[0]] * world_size()
    if sizes[rank()] != x.shape[0]:
        raise ValueError(f"rank {rank()} gathers {x.shape[0]} rows but sizes say {sizes[rank()]}")
    return _GatherRows.apply(x, sizes), sum(sizes[:rank()])


class _GatherRows(torch.autograd.Function):
    """all_gather_rows forward; backward sums the result's gradient over the ranks (all_reduce) and
    keeps this rank's rows. The gloo backend has no reduce_scatter, hence the all_reduce."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes = sizes
        return all_gather_rows(x.detach(), sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = all_reduce(grad.contiguous())
        lo = sum(ctx.sizes[:rank()])
        return total[lo:lo + ctx.sizes[rank()]], None


def dealt_chunks(n: int, chunk: int) -> list[np.ndarray]:
    """Rows ``[c * chunk, (c + 1) * chunk)`` of the chunks ``c`` this rank computes, dealt round-robin.
    The chunks are the same at every world size, so each row is computed in the same company and its
    vector does not depend on the number of ranks (a batched matmul's bits can depend on the batch).
    Every rank gets the same number of entries (empty ones past its last chunk)."""
    world, me = world_size(), rank()
    n_chunks = max(1, -(-n // chunk))
    out = []
    for i in range(-(-n_chunks // world)):
        c = i * world + me
        out.append(np.arange(c * chunk, min((c + 1) * chunk, n), dtype=np.int64) if c < n_chunks
                   else np.zeros(0, np.int64))
    return out


def gather_in_order(local: torch.Tensor, rows: np.ndarray, n: int) -> torch.Tensor:
    """Every rank's ``local`` (its ``rows`` of an n-row result), put in row order, on every rank."""
    everyone = all_gather_rows(local)
    where = all_gather_rows(torch.from_numpy(rows).to(local.device)).long()
    out = everyone.new_empty((n, *everyone.shape[1:]))
    out[where] = everyone
    return out


# ---------------------------------------------------------------- the check used by the tests

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter",
                "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "reduce", "gather", "scatter")


def _direct_caller_in_project(frame) -> str | None:
    """``file:line`` of the code that called the collective when it is project code other than this
    module (calls from inside torch or TorchRec place their own tensors)."""
    path = pathlib.Path(frame.f_code.co_filename).resolve()
    if path == _THIS or ".venv" in path.parts or "site-packages" in path.parts:
        return None
    try:
        path.relative_to(_PROJECT)
    except ValueError:
        return None
    return f"{path.relative_to(_PROJECT)}:{frame.f_lineno}"


def check_collectives() -> None:
    """Makes a collective called from project code outside this module an error: its tensors were not
    placed on the group's device by these helpers, which nccl would reject at run time."""
    for name in _COLLECTIVES:
        fn = getattr(dist, name)
        if getattr(fn, "_twotower_checked", False):
            continue

        @functools.wraps(fn)
        def checked(*args, _fn=fn, _name=name, **kwargs):
            where = _direct_caller_in_project(sys._getframe(1))
            if where is not None:
                raise RuntimeError(f"torch.distributed.{_name} called directly from {where}: use the helpers in "
                                   "trainer/parallel/distributed.py, which put tensors on the process group's device")
            return _fn(*args, **kwargs)

        checked._twotower_checked = True
        setattr(dist, name, checked)
