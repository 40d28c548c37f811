"""One writer per output: a stage holds ``<out>.lock`` while it writes ``<out>``.

The lock is a file created exclusively (``O_CREAT | O_EXCL``, atomic on local disks and on NFS, so it
holds across the nodes of a cluster sharing the filesystem) holding the holder's host, pid, start time
and command line. A second writer fails at once with an error naming the holder. A lock whose holder is
gone (its pid is not running on this host) is taken over with a warning, and so is one left by this same
Slurm job (a requeued job keeps its id and may start on another node); a holder on another host cannot
be checked from here, so the error says which file to remove if that run is known to be dead.

Object stores (s3://, gs://, ...) have no exclusive create through fsspec: there the lock is written
after a check, which catches a writer that started earlier but not two that start in the same instant
(a warning says so).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from data.io import fs_and_path

log = logging.getLogger(__name__)

SUFFIX = ".lock"


class OutputLocked(RuntimeError):
    """Another run is writing this output."""


def _holder_text(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} since {since} ({info.get('command', '?')})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, under another user
        return True
    return True


def _read(fs, path: str) -> dict:
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # being written this instant, or damaged: treated as held by an unknown writer


def _create_local(path: str, text: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


@contextmanager
def output_lock(url: str) -> Iterator[str]:
    """Holds ``<url>.lock`` for the block; raises OutputLocked naming the holder if another run has it."""
    fs, path = fs_and_path(url)
    lock = path.rstrip("/") + SUFFIX
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
          "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
          "slurm_job": os.environ.get("SLURM_JOB_ID"), "token": uuid.uuid4().hex}
    text = json.dumps(me)
    parent = os.path.dirname(lock)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    for attempt in range(2):
        if local:
            taken = _create_local(lock, text)
        else:
            taken = not fs.exists(lock)
            if taken:
                log.warning("%s: object stores have no exclusive create: the lock is checked, then written, "
                            "so two writers starting in the same instant are not told apart", url)
                fs.pipe(lock, text.encode())
        if taken:
            break
        holder = _read(fs, lock)
        dead = (holder.get("host") == me["host"] and isinstance(holder.get("pid"), int)
                and holder["pid"] != me["pid"] and not _alive(holder["pid"]))
        requeued = me["slurm_job"] is not None and holder.get("slurm_job") == me["slurm_job"]
        stale = local and attempt == 0 and (dead or requeued)
        if not stale:
            raise OutputLocked(f"{url} is being written by another run: {_holder_text(holder)}. Wait for it "
                               f"to finish, or, if that run is dead, remove {lock}")
        log.warning("%s: taking over the lock of a run that is gone (%s)", url, _holder_text(holder))
        fs.rm(lock)
    try:
        yield lock
    finally:
        if _read(fs, lock).get("token") == me["token"]:  # ours still: released
            fs.rm(lock)
