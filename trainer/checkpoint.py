"""Checkpoints: torch.distributed.checkpoint for the sharded state, small files for the rest.

Layout of one checkpoint, ``<dir>/step-<N>/``:

    (DCP files)          sharded model (tables as ShardedTensors, dense weights) + fused optimiser state
    dense.pt             dense optimiser and loss/miner state (replicated; written by rank 0, read with
                         weights_only=True)
    rank-<r>.json        per-rank loop state: step, epoch, data stream position, RNG states
    COMPLETE             written last, by rank 0, after every rank finished: only such directories count

DCP's own ``.metadata`` file is a pickle: load only checkpoints this project wrote (the run directory's
own). Everything else is read without pickle (JSON, ``torch.load(weights_only=True)``).

Resume takes the newest complete checkpoint whose load succeeds on every rank; a partial or corrupt one
is skipped with a warning. The newest ``keep`` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d+)$")
MARKER = "COMPLETE"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dirs(root: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) for every step-N directory, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        if m:
            path = os.path.join(root, name)
            out.append((int(m.group(1)), path, os.path.exists(os.path.join(path, MARKER))))
    return sorted(out)


def rng_state() -> dict:
    return {"python": repr(random.getstate()), "numpy": repr(np.random.get_state()[1].tolist()),
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save(root: str, step: int, model, fused_optimizer, dense: dict, loop_state: dict, keep: int) -> str:
    path = os.path.join(root, f"step-{step:08d}")
    if _rank() == 0:
        if os.path.exists(path):  # a partial attempt at this step from an earlier, killed run
            shutil.rmtree(path)
        os.makedirs(path)
    _barrier()
    dcp.save({"model": model.state_dict(), "fused": fused_optimizer.state_dict()}, checkpoint_id=path)
    with open(os.path.join(path, f"rank-{_rank()}.json.tmp"), "w") as f:
        json.dump({**loop_state, "rng": rng_state()}, f)
    os.replace(os.path.join(path, f"rank-{_rank()}.json.tmp"), os.path.join(path, f"rank-{_rank()}.json"))
    if _rank() == 0:
        torch.save(dense, os.path.join(path, "dense.pt.tmp"))
        os.replace(os.path.join(path, "dense.pt.tmp"), os.path.join(path, "dense.pt"))
    _barrier()
    if _rank() == 0:
        with open(os.path.join(path, MARKER + ".tmp"), "w") as f:
            f.write(str(step))
        os.replace(os.path.join(path, MARKER + ".tmp"), os.path.join(path, MARKER))
        complete = [p for _, p, ok in step_dirs(root) if ok]
        for old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def saved_world_size(path: str) -> int:
    """How many ranks wrote the checkpoint (one rank-<r>.json each)."""
    return sum(1 for name in os.listdir(path) if re.match(r"^rank-\d+\.json$", name))


def load_latest(root: str, model, fused_optimizer, with_optimizer: bool = True,
                world_size: int | None = None) -> tuple[dict, dict, str, int] | None:
    """Restores model (and fused optimiser) in place from the newest usable checkpoint; returns
    (dense state, this rank's loop state, path), or None when there is none.

    ``with_optimizer=False`` loads the weights only. A checkpoint written by another number of ranks
    than ``world_size`` is read that way too (its plan may shard the tables, and so the optimiser
    state, differently), with rank 0's loop state. Returns (dense, loop state, path, saved world)."""
    candidates = step_dirs(root)
    for step, path, complete in reversed(candidates):
        if not complete:
            if _rank() == 0:
                log.warning("skipping incomplete checkpoint %s (no %s marker)", path, MARKER)
            continue
        ok, err = True, None
        saved_world = saved_world_size(path)
        same_world = world_size is None or saved_world == world_size
        optimizer_too = with_optimizer and same_world
        try:
            state = {"model": model.state_dict()}
            if optimizer_too:
                state["fused"] = fused_optimizer.state_dict()
            dcp.load(state, checkpoint_id=path)
            with open(os.path.join(path, f"rank-{_rank() if same_world else 0}.json")) as f:
                loop_state = json.load(f)
            dense = torch.load(os.path.join(path, "dense.pt"), weights_only=True)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's error is a BaseException
            ok, err = False, e
        flag = torch.tensor([1 if ok else 0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 0:
            if _rank() == 0 or err is not None:
                log.warning("skipping unreadable checkpoint %s: %s", path, err or "failed on another rank")
            continue
        model.load_state_dict(state["model"])
        if optimizer_too:
            fused_optimizer.load_state_dict(state["fused"])
        set_rng_state(loop_state["rng"])
        return dense, loop_state, path, saved_world
    return None
