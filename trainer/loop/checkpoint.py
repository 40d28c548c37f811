"""Checkpoints of one run: a dict of Stateful parts saved and loaded whole with torch.distributed.checkpoint.

Layout of ``<folder>/step-<N>/``:

    (DCP files)   every part's tensors: the sharded model, the optimisers' state, RNG per rank, the
                  train state (with the data position), logQ and miner state
    run.json      written by rank 0 after every rank finished: the run fingerprint, the resolved config
                  of the run that wrote it, step, world size, a completion sequence number, the data's
                  vocabulary version and lineage, the warm start's parent (if any) and each file's size
                  and SHA-256; its presence marks the checkpoint complete

A save goes to ``.step-<N>.partial`` and is renamed into place once complete, so a checkpoint that
exists is whole, and the newest complete checkpoint is never touched before a newer one is in place.
Saving a step that is already complete does nothing. Keep-last-K counts complete checkpoints in the
order they completed; leftover partial directories are removed when the manager starts.

Loading takes the newest complete checkpoint. A different fingerprint is an error naming the keys; a
tensor whose saved shape differs from the model's is an error naming the tensor; a checkpoint that
cannot be read (a file missing, truncated or not matching its checksum, or DCP failing on it) is moved
aside (renamed ``step-<N>.unreadable-<time>``, kept for inspection, no longer counted by keep-last-K)
with a warning, and the next older one is loaded; training that passes step N again saves it anew. A
checkpoint with a damaged file found at the start of a run is moved aside the same way. Written by another
number of ranks, only the parts that do not depend on the ranks are loaded (the caller is told).

Everything saved is a tensor (trainer/loop/state.py): loading unpickles nothing but DCP's own metadata, so
load only checkpoints written by this project (the run's own directory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from data.runinfo import FILE_ONLY
from trainer.loop.fingerprint import differences, short_id
from trainer.loop.state import BLOB
from trainer.parallel import distributed as D

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d+)$")
RUN_FILE = "run.json"
PER_RANK = {"rng"}  # parts keyed by rank: meaningless on another world size


class CheckpointError(RuntimeError):
    pass


@dataclass
class Found:
    path: str
    step: int
    seq: int
    info: dict  # run.json


@dataclass
class Loaded:
    path: str
    step: int
    saved_world: int
    parts: list[str]  # the parts restored
    info: dict  # its run.json


def _read_run(path: str) -> dict | None:
    try:
        with open(os.path.join(path, RUN_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def file_records(path: str) -> dict:
    """``{file: {"bytes", "sha256"}}`` of a checkpoint directory's files (run.json aside)."""
    out = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.startswith(RUN_FILE) or not os.path.isfile(full):
            continue
        with open(full, "rb") as f:
            out[name] = {"bytes": os.path.getsize(full), "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    return out


def damage(found: Found, checksums: bool = True) -> str | None:
    """Why a complete checkpoint cannot be what its run.json says (a file missing, of another size, or,
    with ``checksums``, of other contents), or None. Checkpoints written before files were recorded pass."""
    recorded = found.info.get("files")
    if recorded is None:
        return None
    for name, rec in sorted(recorded.items()):
        full = os.path.join(found.path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        size = os.path.getsize(full)
        if size != rec["bytes"]:
            return f"{name} has {size} bytes, {rec['bytes']} recorded"
        if checksums:
            with open(full, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != rec["sha256"]:
                    return f"{name} does not match its recorded SHA-256"
    return None


def set_aside(found: Found, why) -> str:
    """Renames an unreadable checkpoint out of the step-<N> namespace (kept for inspection): it no
    longer counts as complete, and the step is saved again when training passes it."""
    aside = f"{found.path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        os.rename(found.path, aside)
    except OSError as e:  # a read-only run directory (an export from someone else's run): skipped only
        log.warning("skipping unreadable checkpoint %s (%s); could not move it aside: %s", found.path, why, e)
        return found.path
    log.warning("skipping unreadable checkpoint %s (%s): moved aside to %s", found.path, why, aside)
    return aside


def complete_checkpoints(folder: str) -> list[Found]:
    """Complete checkpoints, oldest completed first."""
    if not os.path.isdir(folder):
        return []
    out = []
    for name in os.listdir(folder):
        m = STEP_DIR.match(name)
        if not m:
            continue
        path = os.path.join(folder, name)
        info = _read_run(path)
        if info is not None:
            out.append(Found(path, int(m.group(1)), int(info.get("seq", 0)), info))
    return sorted(out, key=lambda f: (f.seq, f.step))


def latest(folder: str) -> Found | None:
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def best(folder: str) -> Found | None:
    """The checkpoint of the best validation recorded by the newest one (None without validation)."""
    newest = latest(folder)
    step = ((newest.info.get("best") or {}).get("step")) if newest else None
    return next((f for f in complete_checkpoints(folder) if f.step == step), None) if step is not None else None


def _flat_sizes(state: dict, prefix: str = "") -> dict[str, tuple[torch.Tensor, tuple]]:
    """Flattened ``fqn -> (tensor, global shape)`` the way DCP names them (dots between keys)."""
    out = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_sizes(v, key + "."))
        elif isinstance(v, torch.Tensor):
            out[key] = (v, tuple(v.size()))
    return out


def _fit_blobs(state: dict, saved: dict, prefix: str = "") -> None:
    """Resizes the JSON blob templates to the saved sizes (their length varies from save to save)."""
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _fit_blobs(v, saved, key + ".")
        elif k == BLOB and key in saved:
            state[k] = torch.empty(tuple(saved[key].size), dtype=torch.uint8)


def _old_names(state: dict, saved: dict, renamed: dict[str, str], prefix: str = "") -> list[tuple[dict, str, str]]:
    """Renames, in place, the keys of ``state`` that the checkpoint holds only under a name from before a
    rename (``renamed``: new name fragment -> old) to that old name, so that DCP reads them; returns
    (dict, old, new) for each, to rename back before the parts load them."""
    def present(key: str) -> bool:
        return key in saved or any(s.startswith(key + ".") for s in saved)

    undo = []
    for k in list(state):
        for new, old in renamed.items():
            if new in k and not present(prefix + k) and present(prefix + k.replace(new, old)):
                state[k.replace(new, old)] = state.pop(k)
                undo.append((state, k.replace(new, old), k))
                k = k.replace(new, old)
                break
        if isinstance(state[k], dict):
            undo += _old_names(state[k], saved, renamed, f"{prefix}{k}.")
    return undo


class CheckpointManager:
    def __init__(self, folder: str, parts: dict, fingerprint: dict, keep: int = 3, config: dict | None = None,
                 renamed: dict[str, str] | None = None, record: dict | None = None):
        self.folder, self.parts, self.fingerprint, self.keep = folder, parts, fingerprint, keep
        self.config = config  # the run's resolved config, recorded in each checkpoint
        self.record = dict(record or {})  # more about the run, recorded in each checkpoint (data, warm start)
        self.renamed = renamed or {}  # new name fragment -> old: checkpoints from before a rename still load
        self.fp_id = short_id(fingerprint)

    # ------------------------------------------------------------ start of a run

    def prepare(self, resume: bool) -> None:
        """Removes leftovers of interrupted saves; with ``resume=False`` removes the checkpoints of an
        earlier run in this folder (they would otherwise be resumed or exported as this run's)."""
        if D.rank() == 0:
            os.makedirs(self.folder, exist_ok=True)
            for name in sorted(os.listdir(self.folder)):
                path = os.path.join(self.folder, name)
                partial = name.startswith(".step-") or (STEP_DIR.match(name) and _read_run(path) is None)
                if partial:
                    log.warning("removing incomplete checkpoint %s (an interrupted save)", path)
                    shutil.rmtree(path, ignore_errors=True)
            for found in complete_checkpoints(self.folder):
                why = damage(found, checksums=False)  # sizes only: the checksums are read when loading
                if why:
                    set_aside(found, why)
            old = complete_checkpoints(self.folder)
            if old and not resume:
                log.warning("trainer.resume=false: removing %d checkpoint(s) of an earlier run in %s (steps %s)",
                            len(old), self.folder, ", ".join(str(f.step) for f in old))
                for f in old:
                    shutil.rmtree(f.path, ignore_errors=True)
        D.barrier()

    # ------------------------------------------------------------ save

    def save(self, step: int, best: dict | None = None) -> str | None:
        """Saves every part at ``step``; a no-op when step ``step`` is already complete. Returns the path.
        ``best`` (the best validation so far: metric, value, step) is recorded, and that checkpoint is
        never rotated out."""
        final = os.path.join(self.folder, f"step-{step:08d}")
        if D.every_rank(_read_run(final) is not None):
            return None
        partial = os.path.join(self.folder, f".step-{step:08d}.partial")
        if D.rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        D.barrier()
        dcp.save({name: part.state_dict() for name, part in self.parts.items()}, checkpoint_id=partial)
        D.barrier()
        if D.rank() == 0:
            done = complete_checkpoints(self.folder)
            info = {"step": step, "seq": (done[-1].seq + 1) if done else 1, "world_size": D.world_size(),
                    "fingerprint": self.fingerprint, "fingerprint_id": self.fp_id, "time": time.time(),
                    "parts": sorted(self.parts), "config": self.config, "best": best,
                    **self.record, "files": file_records(partial)}
            tmp = os.path.join(partial, RUN_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump(info, f, indent=1, default=str)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(partial, RUN_FILE))
            if os.path.exists(final):  # an incomplete directory of this step (no run.json): replace it
                shutil.rmtree(final)
            os.rename(partial, final)
            self._rotate(keep_step=best["step"] if best else None)
            log.info("checkpoint %s", final, extra=FILE_ONLY)
        D.barrier()
        return final

    def _rotate(self, keep_step: int | None = None) -> None:
        if self.keep <= 0:
            return
        for old in complete_checkpoints(self.folder)[:-self.keep]:
            if old.step != keep_step:
                shutil.rmtree(old.path, ignore_errors=True)

    # ------------------------------------------------------------ load

    def check(self, found: Found) -> None:
        saved = found.info.get("fingerprint")
        if saved is None:
            raise CheckpointError(f"{found.path}: {RUN_FILE} has no run fingerprint; not a checkpoint of this "
                                  "project's format")
        diff = differences(saved, self.fingerprint)
        if diff:
            raise CheckpointError(
                f"{found.path} belongs to another run (fingerprint {found.info.get('fingerprint_id')}, now "
                f"{self.fp_id}); it differs in:\n  " + "\n  ".join(diff)
                + "\nResume with the same settings, point at another run directory, or start over with "
                  "trainer.resume=false")

    def load(self, only: set[str] | None = None, step: int | None = None) -> Loaded | None:
        """Restores the parts from the newest complete checkpoint (or the one of ``step``); ``only``
        limits them (e.g. the model for inference). On another world size, the per-rank parts are left
        out. None if there is none."""
        candidates = [f for f in complete_checkpoints(self.folder) if step is None or f.step == step]
        for found in reversed(candidates):
            self.check(found)
            saved_world = int(found.info.get("world_size", D.world_size()))
            names = [n for n in self.parts if (only is None or n in only)
                     and not (n in PER_RANK and saved_world != D.world_size())]
            err = damage(found) if D.rank() == 0 else None  # "complete" must mean "readable"
            meta, ok = {}, err is None
            if D.every_rank(ok):
                try:
                    meta = dcp.FileSystemReader(found.path).read_metadata().state_dict_metadata
                except Exception as e:  # noqa: BLE001 - an unreadable metadata file: try the next one
                    ok, err = False, e
            if D.every_rank(ok):
                state = {n: self.parts[n].state_dict() for n in names}
                undo = _old_names(state, meta, self.renamed)
                _fit_blobs(state, meta)
                self._check_shapes(found.path, state, meta)
                try:
                    dcp.load(state, checkpoint_id=found.path)
                except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's error is a BaseException
                    ok, err = False, e
                for where, old, new in reversed(undo):
                    where[new] = where.pop(old)
            if not D.every_rank(ok):
                if D.rank() == 0:
                    set_aside(found, err or "failed on another rank")
                elif err is not None:
                    log.warning("checkpoint %s unreadable on rank %d: %s", found.path, D.rank(), err)
                D.barrier()
                continue
            for n in names:
                self.parts[n].load_state_dict(state[n])
            return Loaded(found.path, found.step, saved_world, names, found.info)
        return None

    @staticmethod
    def _check_shapes(path: str, state: dict, meta: dict) -> None:
        bad = []
        for key, (_, size) in _flat_sizes(state).items():
            m = meta.get(key)
            if m is None:
                bad.append(f"{key}: missing in the checkpoint")
            elif hasattr(m, "size") and tuple(m.size) != size:
                bad.append(f"{key}: {tuple(m.size)} in the checkpoint, {size} now")
        if bad:
            raise CheckpointError(f"{path} does not fit this run:\n  " + "\n  ".join(bad[:20]))
