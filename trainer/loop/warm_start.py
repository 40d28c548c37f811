"""A warm start: a new run begins from another run's selected checkpoint (``trainer.init_from``) on a prepared
dataset of the same lineage, as a retailer continues last week's model on this week's data.

What is loaded, and how:

- the model, the tables' fused optimiser state and the dense optimiser state; not the data position, the
  step, the RNG, logQ or the miner: the run starts at step 0 on its own data, validated and early-stopped as
  any run;
- a table that grew (new customers, articles or feature values appended by ``prepare.parent``) takes the
  parent's rows in the same rows; its new rows keep what a fresh run gives them (the tables' init drawn
  from the seed, empty optimiser state). The same holds for any state with a row per table row (row-wise
  Adagrad's accumulator, Adam's moments of a replicated table);
- each rank reads the parent's tensors whole (torch.distributed.checkpoint reshards them) and keeps the
  rows of its own shards, so a parent saved on N ranks starts a run on M: a warm start is the same
  training at any world size.

Refused, by name: a parent trained on a vocabulary version that is not in this dataset's lineage (its rows
would mean other ids here), other model settings, a tensor whose shape changed other than by rows added,
a damaged checkpoint. The run records its parent (train dir, checkpoint, step, fingerprint, vocabulary
version) in every checkpoint it writes; resuming it continues it, not its parent.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor

from data.prepared import Prepared, PreparedError
from trainer.loop.checkpoint import CheckpointError, Found, _old_names, damage
from trainer.loop.fingerprint import differences
from trainer.loop.runs import selected_checkpoint, typed

log = logging.getLogger(__name__)

PARTS = ("model", "fused_optimizer", "dense_optimizer")  # what a warm start carries over


@dataclass
class Parent:
    train_dir: str
    checkpoint: str
    which: str  # best | latest
    step: int
    fingerprint_id: str
    vocab_version: str


def parent_version(found: Found) -> str:
    """The vocabulary version the checkpoint's run trained on: recorded in it, or (a run from before
    versions were recorded) read from the prepared dataset its config names."""
    version = (found.info.get("data") or {}).get("version")
    if version:
        return version
    cfg = typed(found.info["config"], int(found.info.get("world_size", 1)))
    try:
        ds = Prepared.read(str(cfg.prepare.out))
    except PreparedError as e:
        raise CheckpointError(f"{found.path} records no vocabulary version and its prepared data is gone ({e}); "
                              "it cannot be checked against this lineage") from None
    if ds.version is None:
        from data.prepare import version_of

        return version_of(ds.url)
    return ds.version


def check_parent(found: Found, ds: Prepared, fingerprint: dict) -> str:
    """The parent's vocabulary version, once it is known to be of ``ds``'s lineage and of this model."""
    version = parent_version(found)
    if not ds.lineage.contains(version):
        raise CheckpointError(
            f"{found.path} was trained on vocabulary version {version}, which is not in the lineage of {ds.url} "
            f"({' -> '.join(ds.lineage.versions) or 'none recorded'}): its rows would mean other ids here. "
            "Prepare this data with prepare.parent=<the prepared dataset that run trained on>, or train from zero")
    saved = found.info.get("fingerprint") or {}
    diff = differences(saved, fingerprint, keys_prefix="model.")
    if diff:
        raise CheckpointError(f"{found.path} is of another model than this run; it differs in:\n  " + "\n  ".join(diff)
                              + "\nA warm start continues the same model: keep its settings")
    return version


def _tensors(state: dict, prefix: str = ""):
    """(container, key, fully qualified name) of every tensor of a nested state dict, as DCP names them."""
    for k, v in state.items():
        fqn = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _tensors(v, fqn + ".")
        elif isinstance(v, torch.Tensor):
            yield state, k, fqn


def _copy_rows(full: torch.Tensor, target: torch.Tensor) -> None:
    """The parent's rows ``full`` into the first rows of ``target`` (this rank's shards of it)."""
    n = full.shape[0]
    if isinstance(target, ShardedTensor):
        for shard in target.local_shards():
            offsets, t = shard.metadata.shard_offsets, shard.tensor
            r0 = offsets[0]
            rows = max(0, min(n - r0, t.shape[0]))
            if rows:
                src = full[r0:r0 + rows]
                if t.dim() > 1:
                    src = src[:, offsets[1]:offsets[1] + t.shape[1]]
                t[:rows].copy_(src.to(device=t.device, dtype=t.dtype))
    else:
        target[:n].copy_(full.to(device=target.device, dtype=target.dtype))


@torch.no_grad()
def load_grown(found: Found, parts: dict, renamed: dict[str, str], optimizer: bool = True) -> list[str]:
    """Loads ``PARTS`` of ``parts`` from the checkpoint (the model only when not ``optimizer``), tensors
    whose rows grew into their first rows; returns the names of the grown tensors."""
    why = damage(found)
    if why:
        raise CheckpointError(f"{found.path} cannot be read: {why}")
    meta = dcp.FileSystemReader(found.path).read_metadata().state_dict_metadata
    names = [n for n in PARTS if n in parts and (optimizer or n == "model")]
    state = {n: parts[n].state_dict() for n in names}
    undo = _old_names(state, meta, renamed)
    grown, bad = [], []
    for container, key, fqn in list(_tensors(state)):
        saved = meta.get(fqn)
        ours = tuple(container[key].size())
        if saved is None or not hasattr(saved, "size"):
            bad.append(f"{fqn}: missing in the checkpoint")
            continue
        size = tuple(saved.size)
        if size == ours:
            continue
        if len(size) == len(ours) and size[1:] == ours[1:] and 0 < size[0] <= ours[0]:
            grown.append((container, key, fqn, container[key]))
            container[key] = torch.empty(size, dtype=container[key].dtype)  # the parent's whole, on every rank
        else:
            bad.append(f"{fqn}: {size} in the checkpoint, {ours} now (only rows may be added)")
    if bad:
        raise CheckpointError(f"{found.path} does not fit this run:\n  " + "\n  ".join(bad[:20]))
    dcp.load(state, checkpoint_id=found.path)
    for container, key, _, target in grown:
        _copy_rows(container[key], target)
        container[key] = target
    for where, old, new in reversed(undo):
        where[new] = where.pop(old)
    for n in names:
        parts[n].load_state_dict(state[n])
    return [fqn for _, _, fqn, _ in grown]


def warm_start(init_from: str, which: str, parts: dict, ds: Prepared, fingerprint: dict,
               renamed: dict[str, str], tell: bool, optimizer: bool = True) -> Parent:
    """Starts the run's parts from ``init_from``'s checkpoint (``which``: selected, best, latest); see the
    module docstring. ``tell``: log what was loaded (rank 0). ``optimizer``: the optimisers' state too
    (``trainer.init_optimizer``)."""
    found, which = selected_checkpoint(init_from, which)
    version = check_parent(found, ds, fingerprint)
    grown = load_grown(found, parts, renamed, optimizer)
    parent = Parent(init_from, found.path, which, found.step, str(found.info.get("fingerprint_id")), version)
    if tell:
        log.info("warm start from %s (the %s checkpoint, step %d, vocabulary %s; this data %s; %s): %d tensor(s) "
                 "grew by new rows%s", found.path, which, found.step, version, ds.version,
                 "weights and optimiser state" if optimizer else "weights only, fresh optimisers", len(grown),
                 f" ({', '.join(grown[:6])}{', ...' if len(grown) > 6 else ''})" if grown else "")
    return parent


def record(parent: Parent | None) -> dict | None:
    return None if parent is None else asdict(parent)
