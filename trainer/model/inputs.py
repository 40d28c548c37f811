"""The model's input: one KeyedJaggedTensor with the model's feature keys, built from a data batch.

``TwoTower.forward(sparse, query_dense, n_query)`` reads B query rows followed by M item-only rows (the
batch's mixed negatives). :class:`ModelInput` carries that KJT plus what the loss needs, moves to a
device as a unit, and names ``forward``'s parameters for TorchRec's FX tracer (``to_proxy_tuple``), so
TrainPipelineSparseDist finds that the embedding collection reads ``batch.sparse`` and prefetches its
input-dist.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from data.batch import Batch, PackedBatch
from data.tables import FeatureTables
from trainer.model.towers import POSITION_PREFIX


def history_positions(history, positions: int) -> torch.Tensor:
    """The history by position, newest first: (positions * B,) article ids, position-major, one per row
    and position (0, the OOV id, past a row's history). On the history's device, without a host sync."""
    lengths = history.lengths()
    ends = torch.cumsum(lengths, 0)
    values = torch.cat([history.values(), history.values().new_zeros(1)])  # the last: a 0 to point at
    pos = torch.arange(positions, device=lengths.device)[:, None]
    idx = torch.where(pos < lengths[None, :], ends[None, :] - 1 - pos, values.numel() - 1)
    return values[idx].reshape(-1)


def recent_articles(sparse, n_rows: int, positions: int) -> torch.Tensor:
    """(B, positions) the rows' last articles, newest first, 0 past a row's history; from the model's
    KJT (the ``history`` bag, or the transformer's ``hist_<p>`` features)."""
    keys = sparse.keys()
    if "history" in keys:  # every row of the KJT (the extra item-only rows have empty histories)
        return history_positions(sparse["history"], positions).view(positions, sparse.stride())[:, :n_rows].T
    cols = [sparse[f"{POSITION_PREFIX}{p}"].values()[:n_rows] for p in range(positions)
            if f"{POSITION_PREFIX}{p}" in keys]
    out = torch.stack(cols, dim=1) if cols else torch.zeros(n_rows, 0, dtype=torch.long)
    if out.shape[1] < positions:  # the encoder reads fewer positions than the bonus has
        out = torch.cat([out, out.new_zeros(n_rows, positions - out.shape[1])], dim=1)
    return out


def join_rows(query: KeyedJaggedTensor, item: KeyedJaggedTensor, keys: list[str],
              extra_items: KeyedJaggedTensor | None = None) -> KeyedJaggedTensor:
    """One KJT with the model's keys for B batch rows plus M extra candidate rows (item features
    only; their query features are empty bags). Works on any device without a host sync as long as the
    inputs know their values per key (data/batch.py's batches do)."""
    qd, idd = query.to_dict(), item.to_dict()
    positions = [k for k in keys if k.startswith(POSITION_PREFIX)]
    if positions:  # the history by position (model.history_encoder=transformer)
        b = query.stride()
        ids = history_positions(qd["history"], len(positions)).view(len(positions), b)
        ones = torch.ones(b, dtype=ids.dtype, device=ids.device)
        qd.update({k: JaggedTensor(values=ids[p], lengths=ones) for p, k in enumerate(positions)})
    ed = extra_items.to_dict() if extra_items is not None else {}
    m = extra_items.stride() if extra_items is not None else 0
    values, lengths = [], []
    for k in keys:
        if k in qd:
            jt = qd[k]
            values.append(jt.values())
            lengths.append(torch.cat([jt.lengths(), jt.lengths().new_zeros(m)]) if m else jt.lengths())
        else:
            jt = idd[k]
            values.append(torch.cat([jt.values(), ed[k].values()]) if m else jt.values())
            lengths.append(torch.cat([jt.lengths(), ed[k].lengths()]) if m else jt.lengths())
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths),
                             stride=query.stride() + m, length_per_key=[int(v.numel()) for v in values])


class _KeyedPlaceholder(torch.fx._symbolic_trace.PHBase):
    """An FX placeholder that remembers which batch attribute it stands for (TorchRec's pipeline reads
    ``ph_key`` to fetch a sharded module's input from the batch)."""

    def __init__(self, key: str):
        super().__init__()
        self.ph_key = key


@dataclass
class ModelInput(Pipelineable):
    sparse: KeyedJaggedTensor  # the model's keys: B rows, then M item-only rows
    query_dense: torch.Tensor  # (B, 3): sin, cos of the time of year, the history's length
    article_idx: torch.Tensor  # (B,) the positive of each row
    extra_ids: torch.Tensor | None = None  # (M,) article_idx of the item-only rows
    day: torch.Tensor | None = None  # (B,) the rows' days (recent sales read their week off it)

    @classmethod
    def from_batch(cls, batch: Batch, keys: list[str]) -> "ModelInput":
        """query_dense: the batch's time of year, then the history's length (for the sequence encoder)."""
        lengths = batch.query["history"].lengths().to(batch.query_dense.dtype)[:, None]
        return cls(join_rows(batch.query, batch.item, keys, batch.extra_item),
                   torch.cat([batch.query_dense, lengths], dim=1), batch.article_idx, batch.extra_ids, batch.day)

    def __len__(self) -> int:
        return int(self.article_idx.numel())

    def recent(self, positions: int) -> torch.Tensor:
        """(B, positions) each row's last articles, newest first, 0 past its history."""
        return recent_articles(self.sparse, len(self), positions)

    def _map(self, fn) -> "ModelInput":
        return ModelInput(*(None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                            for f in fields(self)))

    def to(self, device: torch.device, non_blocking: bool = False) -> "ModelInput":
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> "ModelInput":
        return self._map(lambda t: t.pin_memory())

    def record_stream(self, stream) -> None:
        for f in fields(self):
            if getattr(self, f.name) is not None:
                getattr(self, f.name).record_stream(stream)

    def to_proxy_tuple(self, model) -> dict:
        """FX concrete args for TwoTower.forward(sparse, query_dense, n_query)."""
        return {"sparse": _KeyedPlaceholder("sparse"), "query_dense": _KeyedPlaceholder("query_dense"),
                "n_query": _KeyedPlaceholder("n_query")}


@dataclass
class HostInput(Pipelineable):
    """A packed batch in (pinned) host memory: ``to(device)`` moves it in one copy per buffer and builds
    the model input there (the join runs on the device, in the pipeline's copy stream when pipelined)."""

    packed: PackedBatch
    keys: list[str]

    def __len__(self) -> int:
        return self.packed.batch

    def to(self, device: torch.device, non_blocking: bool = False) -> ModelInput:
        return ModelInput.from_batch(self.packed.to(device, non_blocking=non_blocking).unpack(), self.keys)

    def pin_memory(self) -> "HostInput":
        return HostInput(self.packed.pin_memory(), self.keys)

    def record_stream(self, stream) -> None:  # host memory: nothing to keep alive on a CUDA stream
        pass


def model_input(packed: PackedBatch, keys: list[str], device: torch.device) -> ModelInput:
    """Rows built outside the loader (catalogue items, customers, mined items) as model input on ``device``."""
    return HostInput(packed, keys).to(device, non_blocking=True)


class ItemFeatures:
    """The catalogue's item features on the device: item-only model inputs for any article ids, built
    there (the mined hard negatives of a step need tens of thousands of them; a host gather and copy
    per step would leave the GPU waiting)."""

    def __init__(self, tables: FeatureTables, keys: list[str], device: torch.device):
        self.keys, self.device = keys, device
        self.names = list(tables.article_features)
        self.feats = torch.from_numpy(tables.article.astype(np.int64)).to(device)  # (features, catalogue)
        self.desc = tables.has_desc
        if self.desc:
            lists = tables.desc_lists
            self.desc_off = torch.from_numpy(lists.offsets.to_numpy().astype(np.int64)).to(device)
            self.desc_vals = torch.from_numpy(lists.values.to_numpy().astype(np.int64)).to(device)

    def model_input(self, ids: torch.Tensor) -> ModelInput:
        ids = ids.reshape(-1).to(self.device, torch.int64)
        k = ids.numel()
        ones, zeros = torch.ones_like(ids), torch.zeros_like(ids)
        per_key = {"article_id": (ids, ones)}
        for j, name in enumerate(self.names):
            per_key[name] = (self.feats[j, ids], ones)
        if self.desc:
            starts = self.desc_off[ids]
            lengths = self.desc_off[ids + 1] - starts
            total = int(lengths.sum())  # the one host sync: the size of the token values
            first = torch.cumsum(lengths, 0) - lengths
            pos = (torch.arange(total, device=self.device)
                   + torch.repeat_interleave(starts - first, lengths, output_size=total))
            per_key["desc_tokens"] = (self.desc_vals[pos], lengths)
        values, lens = [], []
        for key in self.keys:
            v, n = per_key.get(key, (ids[:0], zeros))  # query features: empty bags
            values.append(v)
            lens.append(n)
        sparse = KeyedJaggedTensor(keys=self.keys, values=torch.cat(values), lengths=torch.cat(lens), stride=k,
                                   length_per_key=[int(v.numel()) for v in values])
        return ModelInput(sparse, torch.zeros(k, 3, device=self.device), ids)
