"""Managed ids (``model.ids=managed``): the customer and article tables at a fixed size, behind TorchRec's
managed-collision modules (``MCHManagedCollisionModule``: a sorted map from raw ids to the table's rows,
with an eviction policy), so the tables stay the same size however many customers and articles come.

The raw id a module maps is the id's row in the (growing) vocabulary: stable across weeks, unbounded. A
table of ``R`` rows holds ``R - 1`` ids; the last row is where every id the map does not hold goes (an id
never admitted, or evicted): one shared, trained row, as TorchRec's MCH does.

How the map learns (TorchRec's MCH, unchanged): in training each step's ids are recorded; every
``eviction_interval`` steps the recorded ids are counted and the policy (LFU, LRU or distance-LFU)
admits the newcomers that outrank the held ids it evicts. An evicted row starts over: its weights drawn
afresh (from the seed and the step, the same on every rank) and its optimiser state zeroed, as TorchRec's
sharded MC-EBC resets them.

Why not TorchRec's sharded ``ManagedCollisionEmbeddingBagCollection``: in torchrec 1.9.2 it cannot be
sharded on a CPU (README, "Managed ids"), so here the MCH modules sit unsharded in front of the sharded
tables, one copy on every rank. Every rank records the *global* batch's ids (all-gathered, one collective
a step), so every copy makes the same decisions and N ranks train what one rank trains. Each copy holds
3 int64 per table row under LFU (4 under LRU and distance-LFU: a last-seen step): 24 bytes a row against
the row's 256 (64 float32) plus its optimiser state.

What is recorded: the query rows' customers (customer table) and positives (article table): the ids the
data says are active. The history and the negatives are only mapped. The recorded ids since the last
eviction, and the schedule's counters, are part of the state (a resumed run evicts when and what the
uninterrupted run would have).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.mc_modules import (DistanceLFU_EvictionPolicy, LFU_EvictionPolicy, LRU_EvictionPolicy,
                                         MCHManagedCollisionModule)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from trainer.model.towers import ARTICLE_TABLE, managed_rows
from trainer.parallel import distributed as D

POLICIES = {"lfu": LFU_EvictionPolicy, "lru": LRU_EvictionPolicy, "distance_lfu": DistanceLFU_EvictionPolicy}
NOT_PROFILED = -1  # a progress row never profiled
ID_FEATURE = {"t_customer_id": "customer_id", ARTICLE_TABLE: "article_id"}  # a managed table's id feature


def _recorded_in_state(mch: MCHManagedCollisionModule, rows: int) -> None:
    """Sizes the module's record of ids for ``rows`` ids a step now (TorchRec sizes it from the first batch)
    and makes it part of the state, with the policy's per-id history."""
    ids = torch.zeros(rows, dtype=torch.int64, device=mch.device)
    mch._init_history_buffers({"ids": JaggedTensor(values=ids, lengths=torch.ones_like(ids))})
    record = mch._history_accumulator.zero_()
    del mch._history_accumulator  # a plain attribute in TorchRec: a buffer here, so it is checkpointed
    mch.register_buffer("_history_accumulator", record)
    for name in mch._history_metadata:
        mch._non_persistent_buffers_set.discard(f"_history_{name}")


class ManagedIds(nn.Module):
    """The MCH modules of the managed tables. ``forward(sparse, n_query)``: in training, records the first
    ``n_query`` rows' ids of each table's recorded feature over all ranks (evicting on schedule), then maps
    every feature of the managed tables to rows; in eval, maps only."""

    def __init__(self, rows: dict[str, int], features: dict[str, list[str]], recorded: dict[str, str],
                 policy: str, interval: int, global_batch: int, seed: int, device: torch.device):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"model.managed.eviction={policy!r}: expected one of {sorted(POLICIES)}")
        if interval < 1:
            raise ValueError(f"model.managed.eviction_interval={interval}: at least 1 step")
        for table, n in rows.items():
            if n < 2:
                raise ValueError(f"managed table {table} of {n} rows: at least 2 (one id and the shared row)")
        self.features = {t: list(f) for t, f in features.items()}
        self.recorded = dict(recorded)
        self.table_of = {f: t for t, fs in self.features.items() for f in fs}
        self.seed, self.interval, self.global_batch = seed, interval, global_batch
        self.maps = nn.ModuleDict()
        for table, n in rows.items():
            mch = MCHManagedCollisionModule(zch_size=int(n), device=device, eviction_policy=POLICIES[policy](),
                                            eviction_interval=interval, name=table)
            _recorded_in_state(mch, global_batch)  # TorchRec sizes it x interval x 1.25
            self.maps[table] = mch
        # per table: ids recorded since the last eviction, the step of the last eviction, the step
        self.register_buffer("progress", torch.tensor([[0, NOT_PROFILED, NOT_PROFILED]] * len(rows),
                                                      dtype=torch.int64, device=device))
        self._stale = False
        self.on_evict = None  # (table, rows) -> None: the rows' weights and optimiser state start over

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # TorchRec's DistributedModelParallel loads module by module through this (no load post-hooks run)
        super()._load_from_state_dict(*args, **kwargs)
        self._stale = True

    def forward(self, sparse: KeyedJaggedTensor, n_query: int) -> KeyedJaggedTensor:
        keys, per_key = sparse.keys(), sparse.length_per_key()
        parts = list(sparse.values().split(per_key))
        if self.training:
            self._record([parts[keys.index(f)][:n_query] if f in keys else parts[0][:0]
                          for f in self.recorded.values()])
        for table, mch in self.maps.items():
            at = [i for i, k in enumerate(keys) if k in self.table_of and self.table_of[k] == table]
            if not at:
                continue
            mapped = self.map(table, torch.cat([parts[i] for i in at]))
            for i, m in zip(at, mapped.split([per_key[i] for i in at])):
                parts[i] = m
        return KeyedJaggedTensor(keys=keys, values=torch.cat(parts), lengths=sparse.lengths(),
                                 stride=sparse.stride(), length_per_key=per_key)

    @torch.no_grad()
    def map(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``table`` for raw ``ids`` (vocabulary indices): the map's row, or the shared last row."""
        flat = ids.reshape(-1).long()
        out = self.maps[table].remap({table: JaggedTensor(values=flat, lengths=torch.ones_like(flat))})
        return out[table].values().to(ids.dtype).reshape(ids.shape)

    @torch.no_grad()
    def _record(self, local: list[torch.Tensor]) -> None:
        """Each table's ids of this step over all ranks, in rank order, into its MCH module; evictions
        handed to ``on_evict``."""
        tables = list(self.recorded)
        gathered = _all_ranks(local, self.global_batch)
        if self._stale:
            self._restore()
        for i, table in enumerate(tables):
            mch = self.maps[table]
            ids = gathered[i]
            mch.profile({table: JaggedTensor(values=ids, lengths=torch.ones_like(ids))})
            self.progress[list(self.maps).index(table)] = torch.tensor(
                [mch._current_history_buffer_offset, mch._last_eviction_iter, mch._current_iter])
            evicted = mch.evict()
            if evicted is not None and evicted.numel() and self.on_evict is not None:
                self.on_evict(table, torch.sort(evicted.long()).values, mch._current_iter)

    def _restore(self) -> None:
        """After a load: the MCH modules' counters (Python ints in TorchRec) from the saved progress."""
        for i, (table, mch) in enumerate(self.maps.items()):
            offset, last, step = (int(x) for x in self.progress[i].tolist())
            if step != NOT_PROFILED:
                mch._current_history_buffer_offset, mch._last_eviction_iter, mch._current_iter = offset, last, step
        self._stale = False


def _all_ranks(local: list[torch.Tensor], global_batch: int) -> list[torch.Tensor]:
    """``local[i]`` of every rank, concatenated in rank order (one all-gather: each rank's tensors padded to
    its share of the global batch, with their lengths)."""
    world = D.world_size()
    if world == 1:
        return [t.long() for t in local]
    width = -(-global_batch // world)
    row = torch.full((len(local), width + 1), -1, dtype=torch.int64, device=local[0].device)
    for i, t in enumerate(local):
        if t.numel() > width:
            raise ValueError(f"{t.numel()} ids on one rank, more than its share ({width}) of the global batch")
        row[i, 0] = t.numel()
        row[i, 1:1 + t.numel()] = t.long()
    out = D.all_gather(row)
    return [torch.cat([r[i, 1:1 + int(r[i, 0])] for r in out]) for i in range(len(local))]


def served_tables(managed: ManagedIds, weights: dict[str, torch.Tensor], cards: dict) -> dict[str, torch.Tensor]:
    """The tables as a served program reads them (by vocabulary id): a managed table becomes one row per
    vocabulary id, the row its map gives the id (the shared row for ids it does not hold), so the served
    answer is the one evaluation measured."""
    out = dict(weights)
    for table in managed.maps:
        ids = torch.arange(int(cards[ID_FEATURE[table]]), device=managed.progress.device)
        out[table] = weights[table][managed.map(table, ids).cpu()]
    return out


def managed_tables(cfg, features_by_table: dict[str, list[str]], global_batch: int, seed: int,
                   device: torch.device) -> ManagedIds:
    """The ManagedIds of the model settings ``cfg`` (model.*) for the tables' features."""
    rows = {t: n for t, n in managed_rows(cfg).items() if t in features_by_table}
    return ManagedIds(rows, {t: features_by_table[t] for t in rows}, {t: ID_FEATURE[t] for t in rows},
                      str(cfg.managed.eviction), int(cfg.managed.eviction_interval), global_batch, seed, device)
