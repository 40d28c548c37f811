"""The parts of a run's state that are not the model: each ``Stateful``, each holding tensors only.

A checkpoint is ``{name: part}`` saved and loaded whole by trainer/loop/checkpoint.py with
torch.distributed.checkpoint. Everything here is a tensor, so no part of a checkpoint is unpickled
(small structured values travel as UTF-8 JSON in a uint8 tensor, a "blob"). Parts that differ between
ranks (RNG) are keyed by rank, since DCP keeps one copy of a key written by every rank. The data position
is not per rank: it is the number of global batches done in the epoch (data/shards.py), in TrainState.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field

import numpy as np
import torch

BLOB = "json"  # the key of a blob tensor; the checkpoint manager sizes it from the saved metadata

log = logging.getLogger(__name__)


def blob(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).clone()


def unblob(t: torch.Tensor):
    return json.loads(bytes(t.cpu().numpy().tobytes()).decode())


@dataclass
class TrainState:
    """Where the run is: step, epoch, position in the epoch, and what it has measured so far.
    ``batch_in_epoch`` counts global batches of ``global_batch_size`` rows: the position means the same
    on any number of ranks, so a run resumes exactly on another world size."""

    step: int = 0
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # global batches of epoch ``epoch`` trained so far
    validated: int = 0  # epochs whose validation has run (a stop during validation leaves it behind)
    history: dict = field(default_factory=lambda: {"val": [], "train": []})
    global_batch_size: int = 0  # the batch the position counts in (0: a checkpoint from before it was global)
    world_size: int = 1  # the ranks of the run that saved it (a record; the position does not depend on it)

    def state_dict(self) -> dict:
        ints = torch.tensor([self.step, self.epoch, self.batch_in_epoch, self.validated], dtype=torch.int64)
        layout = {"global_batch_size": self.global_batch_size, "world_size": self.world_size}
        return {"counters": ints, BLOB: blob({"history": self.history, "layout": layout})}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch_in_epoch, self.validated = (int(x) for x in state["counters"])
        saved = unblob(state[BLOB])
        if "layout" not in saved:  # the blob was the history alone, and the position was per rank
            saved = {"history": saved, "layout": {"global_batch_size": 0, "world_size": 0}}
        self.history = saved["history"]
        self.global_batch_size = int(saved["layout"]["global_batch_size"])
        self.world_size = int(saved["layout"]["world_size"])

    def continue_as(self, batch: int, world: int, saved_from: str, saved_world: int, tell: bool) -> None:
        """After loading: this run's global batch and world size. The position holds on another world size
        (the training continues as it would have); counted in batches of another size, the epoch starts
        over. ``tell``: log what happened (rank 0)."""
        if self.global_batch_size != batch and self.batch_in_epoch > 0:
            if tell:
                log.warning("%s was saved with a global batch of %s rows, this run has %d: epoch %d starts over",
                            saved_from, self.global_batch_size or "per-rank", batch, self.epoch)
            self.batch_in_epoch = 0
        elif saved_world != world and tell:
            log.info("world size changed from %d to %d: the global batch (%d rows) and the position in epoch %d "
                     "are the same, so the training continues as it would have", saved_world, world, batch,
                     self.epoch)
        self.global_batch_size, self.world_size = batch, world
        if tell:
            log.info("resumed from %s (step %d, epoch %d)", saved_from, self.step, self.epoch)


class RngState:
    """Python's, NumPy's and torch's global generators (CPU and this rank's GPU)."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        py = random.getstate()
        np_state = np.random.get_state()
        out = {"torch": torch.get_rng_state(),
               BLOB: blob({"python": [py[0], list(py[1]), py[2]],
                           "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]})}
        if self.device.type == "cuda":
            out["cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)
        other = unblob(state[BLOB])
        py = other["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = other["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


class OptimizerState:
    """An optimiser's per-parameter state only (moments, step counts): learning rates and other
    hyper-parameters come from the config of the run that loads it."""

    def __init__(self, optimizer):
        self.optimizer = optimizer  # a torchrec KeyedOptimizer (state keyed by parameter name)
        optimizer.save_param_groups(False)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()["state"]

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict({"state": state})


class ModelState:
    """The sharded model's state dict (tables as ShardedTensors, dense weights replicated)."""

    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


class PerRank:
    """Keys a per-rank part by rank, so that DCP keeps every rank's copy."""

    def __init__(self, part, rank: int):
        self.part, self.rank = part, rank

    def state_dict(self) -> dict:
        return {f"rank{self.rank}": self.part.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.part.load_state_dict(state[f"rank{self.rank}"])
