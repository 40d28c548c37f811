"""The query tower for serving: the trained TwoTower's query side without TorchRec, as one plain module
that ``torch.export`` turns into a program with a dynamic batch (trainer/bundle.py writes it).

Inputs, for B queries: ``customer`` (B,) customer rows, ``features`` (B, F) the customer's feature ids
(the model's customer features, in ``feature_names`` order), ``history`` (B, H) the last purchases,
newest first, 0-padded, ``lengths`` (B,) how many of them are real, ``time`` (B, 2) the time-of-year
features of the day. Outputs: the scoring vectors (the towers' vector, plus the recent-sales column
when the model has it) and the buying-again level of each query (zeros when the model has no mixture).

Tables are row-wise INT8 (``int8=True``: per row a scale and an offset, about a quarter of the fp32
bytes) or fp32. Lookups of a single id are what TorchRec's mean pooling gives for one id; the history
bag is the mean of its real entries; the transformer reads the first ``history_positions`` entries.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.towers import TwoTower, table_name

INT8_LEVELS = 255


class Table(nn.Module):
    """An embedding table for lookups by id: fp32, or row-wise INT8 (scale and offset per row)."""

    def __init__(self, weight: torch.Tensor, int8: bool):
        super().__init__()
        weight = weight.detach().float().cpu()
        self.int8 = int8
        if int8:
            lo, hi = weight.min(1).values, weight.max(1).values
            scale = ((hi - lo) / INT8_LEVELS).clamp_min(torch.finfo(torch.float32).tiny)
            codes = torch.round((weight - lo[:, None]) / scale[:, None]).clamp(0, INT8_LEVELS).to(torch.uint8)
            self.register_buffer("codes", codes)
            self.register_buffer("scale", scale)
            self.register_buffer("offset", lo)
        else:
            self.register_buffer("weight", weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.int8:
            return self.codes[ids].float() * self.scale[ids][..., None] + self.offset[ids][..., None]
        return self.weight[ids]


class ServingQueryTower(nn.Module):
    def __init__(self, model: TwoTower, weights: dict[str, torch.Tensor], customer_features: list[str],
                 mean_item: torch.Tensor, int8: bool):
        super().__init__()
        cfg = model.cfg
        self.query_features = list(model.query_features)
        self.feature_names = [f for f in self.query_features if f not in ("customer_id", "history")]
        unknown = [f for f in self.feature_names if f not in customer_features]
        if unknown:
            raise ValueError(f"query features {unknown} are not customer features of the prepared data")
        needed = {table_name(f) for f in self.query_features if f != "history"}
        if "history" in self.query_features:
            needed.add(table_name("history"))
        self.tables = nn.ModuleDict({name: Table(weights[name], int8) for name in sorted(needed)})
        self.table_of = {f: table_name(f) for f in self.query_features}
        self.sequence = copy.deepcopy(model.sequence).eval() if model.sequence is not None else None
        self.positions = len(model.positions)
        self.query_tower = copy.deepcopy(model.query_tower).eval()
        self.normalize, self.time_features = bool(cfg.normalize), bool(cfg.time_features)
        self.sales = model.sales is not None
        repeats = model.repeats
        self.level = copy.deepcopy(repeats.level).eval() if repeats is not None and repeats.mixture else None
        self.register_buffer("mean_item", mean_item.detach().float().cpu())  # the towers' columns, OOV row left out

    def forward(self, customer: torch.Tensor, features: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor,
                time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for f in self.query_features:
            table = self.tables[self.table_of[f]]
            if f == "customer_id":
                parts.append(table(customer))
            elif f == "history":
                parts.append(self._history(table, history, lengths))
            else:
                parts.append(table(features[:, self.feature_names.index(f)]))
        if self.time_features:
            parts.append(time)
        q = self.query_tower(torch.cat(parts, dim=1))
        if self.normalize:
            q = F.normalize(q, dim=-1)
        level = (self.level(q)[:, 0] + q @ self.mean_item) if self.level is not None else q.new_zeros(q.shape[0])
        if self.sales:
            q = torch.cat([q, q.new_ones(q.shape[0], 1)], dim=1)
        return q, level

    def _history(self, table: Table, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.sequence is not None:  # the transformer: the newest positions, OOV past the history
            seq = table(history[:, :self.positions])
            return self.sequence(seq, lengths)
        emb = table(history)  # the bag: the mean of the real entries (an empty bag is zeros)
        real = (torch.arange(history.shape[1], device=history.device)[None, :] < lengths[:, None]).to(emb.dtype)
        return (emb * real[..., None]).sum(1) / lengths.clamp(min=1).to(emb.dtype)[:, None]


class ServingItemTower(nn.Module):
    """The item tower for an article known by its features alone: the OOV row in the id's place, as the
    model scores an article it never trained on (trainer/model/cold.py), fp32 tables. Inputs, for B
    articles: ``features`` (B, G) the item feature ids in ``feature_names`` order, ``tokens`` (B, T) the
    description's hashed tokens, 0-padded, and ``lengths`` (B,) how many are real. Output: (B, D) the
    item tower's vectors (the scoring column of recent sales is the bundle's to add)."""

    def __init__(self, model: TwoTower, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.item_features = list(model.item_features)
        self.feature_names = [f for f in self.item_features if f not in ("article_id", "desc_tokens")]
        self.tables = nn.ModuleDict({table_name(f): Table(weights[table_name(f)], False)
                                     for f in self.item_features if f != "article_id"})
        self.register_buffer("unknown_article", weights[table_name("article_id")][0].detach().float().cpu().clone())
        self.item_tower = copy.deepcopy(model.item_tower).eval()
        self.normalize = bool(model.cfg.normalize)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        parts = []
        for f in self.item_features:
            if f == "article_id":
                parts.append(self.unknown_article[None, :].expand(features.shape[0], -1))
            elif f == "desc_tokens":  # the bag's mean over its real tokens (an empty bag is zeros)
                emb = self.tables[table_name(f)](tokens)
                real = (torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]).to(emb.dtype)
                parts.append((emb * real[..., None]).sum(1) / lengths.clamp(min=1).to(emb.dtype)[:, None])
            else:
                parts.append(self.tables[table_name(f)](features[:, self.feature_names.index(f)]))
        i = self.item_tower(torch.cat(parts, dim=1))
        return F.normalize(i, dim=-1) if self.normalize else i


def export_item_program(tower: ServingItemTower):
    """``torch.export`` of the item tower with dynamic batch and token widths."""
    batch, width = torch.export.Dim("batch", min=1, max=1 << 20), torch.export.Dim("width", min=1, max=1 << 12)
    example = (torch.zeros(2, len(tower.feature_names), dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64),
               torch.ones(2, dtype=torch.int64))
    with torch.no_grad():
        return torch.export.export(tower.eval(), example, dynamic_shapes=({0: batch}, {0: batch, 1: width}, {0: batch}))


def export_program(tower: ServingQueryTower, n_features: int, width: int):
    """``torch.export`` of the tower with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    example = (torch.zeros(2, dtype=torch.int64), torch.zeros(2, n_features, dtype=torch.int64),
               torch.zeros(2, width, dtype=torch.int64), torch.ones(2, dtype=torch.int64), torch.zeros(2, 2))
    dynamic = ({0: batch}, {0: batch}, {0: batch}, {0: batch}, {0: batch})
    with torch.no_grad():
        return torch.export.export(tower.eval(), example, dynamic_shapes=dynamic)
