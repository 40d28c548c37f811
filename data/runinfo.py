"""Run directories: every stage records its resolved config (and later its report) in one place."""

from __future__ import annotations

import logging
import resource
import sys

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from data.io import fs_and_path, join


def progress_bar(iterable=None, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar shown only on a terminal: in a log file or a Slurm output each refresh would be a line of
    its own (``disable=None`` is tqdm's "off when not a TTY")."""
    return tqdm(iterable, disable=None if enabled else True, **kwargs)


def start_run(cfg: DictConfig) -> str:
    """Creates ``cfg.run_dir`` and writes the fully resolved config there; returns the directory URL.

    Resolving here also surfaces a missing mandatory value (``???``) before any work starts.
    """
    run_dir = str(cfg.run_dir)
    fs, path = fs_and_path(run_dir)
    fs.makedirs(path, exist_ok=True)
    with fs.open(fs_and_path(join(run_dir, "config.yaml"))[1], "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    return run_dir


def peak_rss_mb() -> int:
    """Peak resident set size of this process, in MB (Linux reports KB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# ``log.info(..., extra=FILE_ONLY)``: a detail for the run's log file, not the console.
FILE_ONLY = {"file_only": True}


class ConsoleFilter(logging.Filter):
    """Lets through to the console the project's own records, and errors from anywhere; the rest
    (TorchRec's planner, FBGEMM, library warnings) reaches only the run's log file
    (conf/hydra/job_logging/twotower.yaml). Python warnings are routed to logging on the way, so
    that they land in the log file instead of on the console."""

    OWN = ("__main__", "data", "trainer", "launch", "bench")

    def __init__(self):
        super().__init__()
        logging.captureWarnings(True)
        if "torch" in sys.modules:  # torch logs through its own stderr handler; send it to ours instead
            torch_log = logging.getLogger("torch")
            for handler in list(torch_log.handlers):
                if type(handler) is not logging.FileHandler:
                    torch_log.removeHandler(handler)
            torch_log.propagate = True

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        return record.name.split(".")[0] in self.OWN and not getattr(record, "file_only", False)
