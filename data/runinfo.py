"""Run directories: every stage records its resolved config (and later its report) in one place."""

from __future__ import annotations

import resource

from omegaconf import DictConfig, OmegaConf

from data.io import fs_and_path, join


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
