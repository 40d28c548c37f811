"""What a run reports: quieter library logs, the progress line, and TensorBoard scalars (rank 0 only)."""

from __future__ import annotations

import logging
import os


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
