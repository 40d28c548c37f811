"""Running train steps over a loader: plainly, or through TorchRec's TrainPipelineSparseDist, which
moves the next batch to the device and starts its embedding input-dist while this step computes.

Either way each step yields (examples, loss tensor, stats, positive ids). The pipeline pulls batches
ahead; the loop counts the batches *trained* (TrainState.batch_in_epoch), which is the data position a
checkpoint records, so no pulled-ahead batch is skipped on resume.
"""

from __future__ import annotations

import logging
import time

import torch

from trainer.config import Pipeline
from trainer.loop.task import TrainTask
from trainer.model.inputs import HostInput, ModelInput

log = logging.getLogger(__name__)


def use_pipeline(mode: Pipeline, hard_negatives: bool, device: torch.device, world: int,
                 managed: bool = False) -> bool:
    """auto: wherever there is an input-dist to overlap, i.e. more than one rank (measured: 1.15x with 2
    CPU ranks; in one process on an H100 it ran at 0.95x of plain steps, bench/train.py); never with mined
    hard negatives, which need a second, unpipelined table lookup per step, nor with managed ids, whose map
    stands between the batch and the lookup."""
    if managed:
        if mode == Pipeline.on:
            raise ValueError("trainer.pipeline=on cannot run with model.ids=managed (the ids are mapped to rows "
                             "inside the step, so the lookup's input-dist cannot start ahead); use auto or off")
        return False
    if hard_negatives:
        if mode == Pipeline.on:
            raise ValueError("trainer.pipeline=on cannot run with loss.hard_negatives > 0 (the mined negatives "
                             "need a second embedding lookup per step); use pipeline=auto or off")
        return False
    return mode == Pipeline.on or (mode == Pipeline.auto and world > 1)


class _NoDenseOptimizer:
    """What the pipeline steps when the model has no dense parameters (matrix factorisation)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


class Steps:
    def __init__(self, model, dense_optimizer, task: TrainTask, keys: list[str], device: torch.device,
                 pipelined: bool, compiled: list[str] | None = None):
        self.model, self.dense_optimizer, self.task = model, dense_optimizer, task
        self.keys, self.device = keys, device
        self.compiled = list(compiled or [])  # the compiled modules: they compile in the first step
        self.compile_seconds: float | None = None  # how long that step took, once it has run
        self.pipeline = None
        if pipelined:
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            self.pipeline = TrainPipelineSparseDist(model, dense_optimizer or _NoDenseOptimizer(), device,
                                                    execute_all_batches=True, custom_model_fwd=self._forward)

    def _forward(self, inp: ModelInput):
        loss, stats, pos_ids = self.task(inp)
        return loss, (loss.detach(), stats, pos_ids)

    def _inputs(self, loader):
        """The loader's packed host batches (moved to the device, and joined there, by ``.to``)."""
        batches = iter(loader)
        try:
            for packed in batches:
                yield HostInput(packed, self.keys)
        finally:
            if hasattr(batches, "close"):
                batches.close()

    def run(self, loader):
        """Trains on the loader's batches; yields (examples, loss, stats) after each step."""
        inputs = self._inputs(loader)
        try:
            while True:
                started = time.perf_counter()
                if self.pipeline is not None:
                    try:
                        loss, stats, pos_ids = self.pipeline.progress(inputs)
                    except StopIteration:
                        return
                else:
                    inp = next(inputs, None)
                    if inp is None:
                        return
                    loss, stats, pos_ids = self._plain_step(inp.to(self.device, non_blocking=True))
                if self.compiled and self.compile_seconds is None:
                    self._compiled_in(time.perf_counter() - started)
                yield len(pos_ids), loss, stats, pos_ids
        finally:  # also when the loop stops mid-epoch: the loader's workers shut down now
            inputs.close()

    def _compiled_in(self, seconds: float) -> None:
        """Reports, once, the first step's time: the compile of the dense modules (trainer.compile)."""
        self.compile_seconds = seconds
        log.info("torch.compile of %s: the first step took %.1f s", ", ".join(self.compiled), seconds)

    def _plain_step(self, inp: ModelInput):
        loss, stats, pos_ids = self.task(inp)
        if self.dense_optimizer is not None:
            self.dense_optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the fused table optimiser steps inside backward
        if self.dense_optimizer is not None:
            self.dense_optimizer.step()
        return loss.detach(), stats, pos_ids

    def detach(self) -> None:
        """Gives the tables their own forward back (for validation and export; training re-attaches)."""
        if self.pipeline is not None:
            self.pipeline.detach()
