"""What a run reports: quieter library logs, the step lines (StepLogger), and TensorBoard scalars (rank 0
only)."""

from __future__ import annotations

import logging
import os
import time

import torch

from data.runinfo import FILE_ONLY
from trainer.parallel import distributed as D

log = logging.getLogger(__name__)


class _QuietFbgemm(logging.Filter):
    """FBGEMM logs a dozen lines per table-batched kernel (its full argument dict among them) on the
    root logger at INFO; they drown the training log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and str(record.msg).startswith("[TBE="))


class _QuietPipeline(logging.Filter):
    """TrainPipelineSparseDist logs at INFO on every epoch end; keep only what it pipelined, and warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "pipelined" in str(record.msg)


def quiet_libraries() -> None:
    """Call after Hydra has configured logging."""
    root = logging.getLogger()
    if not any(isinstance(f, _QuietFbgemm) for f in root.filters):
        root.addFilter(_QuietFbgemm())
    for name in ("train_pipelines", "utils"):
        logging.getLogger(f"torchrec.distributed.train_pipeline.{name}").addFilter(_QuietPipeline())


class Scalars:
    """TensorBoard scalars under ``<run_dir>/tb``; a no-op unless ``enabled`` (rank 0 of a run)."""

    def __init__(self, run_dir: str, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))

    def add(self, values: dict, step: int, prefix: str) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class StepLogger:
    """The training losses every ``trainer.log_every`` steps: averaged over the ranks (the one collective
    of a logging step), with examples/s and the learning rate, into the log file, TensorBoard and the
    train state's history; the console gets one line every ``trainer.console_every_s``."""

    def __init__(self, loop_cfg, state, scalars: Scalars, world: int, rank: int):
        self.cfg, self.state, self.scalars, self.world, self.rank = loop_cfg, state, scalars, world, rank
        self._examples, self._t_log = 0, time.perf_counter()  # examples/s between log lines
        self._t_console = float("-inf")  # when a step line last went to the console

    def due(self, step: int) -> bool:
        """Whether step ``step`` (0-based: the one about to run) is logged (its task computes the stats)."""
        return (step + 1) % self.cfg.log_every == 0 or step == 0

    def count(self, examples: int) -> None:
        self._examples += examples

    def log(self, loss: torch.Tensor, stats: dict, lr: float) -> None:
        st, world = self.state, self.world
        plain = stats.get("in_batch_loss", torch.full_like(loss.detach(), float("nan")))
        both = D.all_reduce(torch.stack([loss.detach().float(), plain.float()])) / world
        mean_loss, in_batch_loss = both.tolist()
        now = time.perf_counter()
        per_rank = self._examples / max(now - self._t_log, 1e-9)
        self._examples, self._t_log = 0, now
        st.history["train"].append({"step": st.step, "epoch": st.epoch, "loss": mean_loss,
                                    "in_batch_loss": in_batch_loss})
        if self.rank == 0:
            to_console = now - self._t_console >= self.cfg.console_every_s or st.step == 1
            self._t_console = now if to_console else self._t_console
            log.info("step %d epoch %d in-batch loss %.4f (objective %.4f) in-batch acc %.3f | %.0f ex/s total, "
                     "%.0f ex/s per rank | lr %.2e", st.step, st.epoch, in_batch_loss, mean_loss,
                     stats.get("in_batch_acc", float("nan")), per_rank * world, per_rank, lr,
                     extra=None if to_console else FILE_ONLY)
        self.scalars.add({"loss": mean_loss, "in_batch_loss": in_batch_loss, "examples_per_s": per_rank * world,
                          "lr": lr, "in_batch_acc": stats.get("in_batch_acc", float("nan"))}, st.step, "train")
