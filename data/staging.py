"""Stage outputs that appear whole or not at all.

A stage writes everything into a fresh sibling directory (``<out>.staging-<token>``), its commit mark
(manifest or report) last, and then publishes it in place of ``<out>``: on a local filesystem one rename
puts the old output aside (``<out>.old-<token>``) and a second puts the new one in place, so a reader sees
the previous complete output, the new complete output, or (for the instant between the two renames,
and only if the process dies there) no output with a clear "not found", never a mixture. A stage killed
part-way leaves only its staging directory, which the next run of the stage removes. One run writes an
output at a time: the stage holds ``<out>.lock`` throughout (data/lock.py), and a second fails at once.

On object stores (s3://, gs://) a directory move is a copy: there the commit mark written last is what
makes the output complete, and readers check for it.

    with staged(out) as tmp:
        write_parquet(table, join(tmp, "part.parquet"))
        write_json(manifest, join(tmp, "manifest.json"))   # the commit mark, last
    # published here: ``out`` now holds exactly what was written to ``tmp``
"""

from __future__ import annotations

import logging
import os
import posixpath
import uuid
from contextlib import contextmanager
from typing import Iterator

from data.io import fs_and_path
from data.lock import output_lock

log = logging.getLogger(__name__)

STAGING, OLD = ".staging-", ".old-"


def _siblings(fs, path: str, marker: str) -> list[str]:
    parent, name = posixpath.split(path.rstrip("/"))
    if not fs.exists(parent or "."):
        return []
    return [p for p in fs.ls(parent or ".", detail=False) if posixpath.basename(p).startswith(name + marker)]


def recover(url: str) -> None:
    """Tidies what a killed run left: staging directories are removed; an output put aside whose
    replacement never arrived (death between the two renames) is put back."""
    fs, path = fs_and_path(url)
    for leftover in _siblings(fs, path, STAGING):
        log.info("removing %s, left by an interrupted run", leftover)
        fs.rm(leftover, recursive=True)
    for old in _siblings(fs, path, OLD):
        if not fs.exists(path):
            log.warning("restoring %s from %s (a run died while publishing its output)", url, old)
            fs.mv(old, path, recursive=True)
        else:
            fs.rm(old, recursive=True)


@contextmanager
def staged(url: str, mark: str | None = None) -> Iterator[str]:
    """Yields a fresh directory URL to write the output into; publishes it as ``url`` when the block
    ends without an exception. ``mark`` (a file name) must exist in it by then: the commit mark."""
    fs, path = fs_and_path(url)
    with output_lock(url):  # one writer: the tidy-up below removes any other run's staging directory
        recover(url)
        token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = path.rstrip("/") + STAGING + token
        fs.makedirs(tmp, exist_ok=False)
        try:
            yield fs.unstrip_protocol(tmp) if "://" in url else tmp
        except BaseException:
            fs.rm(tmp, recursive=True)
            raise
        if mark is not None and not fs.exists(posixpath.join(tmp, mark)):
            fs.rm(tmp, recursive=True)
            raise RuntimeError(f"{url}: the stage wrote no {mark}; its output is not published")
        publish(fs, tmp, path, token)


def publish(fs, tmp: str, path: str, token: str) -> None:
    old = path.rstrip("/") + OLD + token
    had_old = fs.exists(path)
    if had_old:
        fs.mv(path, old, recursive=True)
    fs.mv(tmp, path, recursive=True)
    if had_old:
        fs.rm(old, recursive=True)



def output_of(run_dir: str) -> str:
    """Where a run-directory stage (export, index) publishes its output: a subdirectory, so that the
    run's own log and config, written there while the stage runs, stay outside the published unit."""
    return posixpath.join(run_dir.rstrip("/"), "output")
