"""A batch of examples: columns with every feature resolved (``Columns``), packed into one int64 buffer
(``PackedBatch``) and unpacked on the device into KeyedJaggedTensors (``Batch``): the query side
(customer id, customer features, the purchase history as a jagged bag of article ids), the item side
(article id and features, description tokens as a bag) and dense time-of-year features. Built the same
way for streamed examples and for arbitrary rows (``packed_from_arrays``: catalogue items, evaluation
customers, extra negatives)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data import features
from data.jagged import Jagged
from data.tables import FeatureTables

QUERY_KEYS = ["customer_id", *features.CUSTOMER_FEATURES, "history"]


@dataclass
class Batch:
    """One batch of examples as KJTs and tensors, movable to a device as a unit."""

    query: KeyedJaggedTensor
    item: KeyedJaggedTensor
    query_dense: torch.Tensor  # (B, 2): sin, cos of the time of year
    customer_idx: torch.Tensor  # (B,) int64
    article_idx: torch.Tensor  # (B,) int64: the positive item of each row
    extra_item: KeyedJaggedTensor | None = None  # M extra catalogue articles (mixed negatives)
    extra_ids: torch.Tensor | None = None  # (M,) int64: their article_idx
    day: torch.Tensor | None = None  # (B,) int64: the row's day (days since 1970-01-01)

    def _map(self, fn) -> "Batch":
        return Batch(*(None if getattr(self, f) is None else fn(getattr(self, f)) for f in self._fields()))

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())

    @staticmethod
    def _fields() -> tuple[str, ...]:
        return ("query", "item", "query_dense", "customer_idx", "article_idx", "extra_item", "extra_ids", "day")

    def __len__(self) -> int:
        return int(self.article_idx.numel())


@dataclass
class Columns:
    """A run of examples with every feature resolved, ready to be cut into batches by slicing.

    Built once per shuffle window (on the prefetch thread), so per-batch work is only copying slices.
    """

    customer: np.ndarray  # (n,) int32 (everything stays int32 until packed into the int64 buffer)
    article: np.ndarray  # (n,) int32
    cust_feats: np.ndarray  # (F, n) int32, feature-major
    art_feats: np.ndarray  # (G, n) int32
    history: Jagged
    desc: Jagged | None
    tod: np.ndarray  # (n, 2) float32
    day: np.ndarray  # (n,) int32: days since 1970-01-01

    def __len__(self) -> int:
        return len(self.customer)

    def slice(self, lo: int, hi: int | None = None) -> "Columns":
        hi = len(self) if hi is None else hi
        return Columns(self.customer[lo:hi], self.article[lo:hi], self.cust_feats[:, lo:hi],
                       self.art_feats[:, lo:hi], self.history.slice(lo, hi),
                       self.desc.slice(lo, hi) if self.desc is not None else None, self.tod[lo:hi],
                       self.day[lo:hi])

    def concat(self, other: "Columns") -> "Columns":
        return Columns(np.r_[self.customer, other.customer], np.r_[self.article, other.article],
                       np.concatenate([self.cust_feats, other.cust_feats], axis=1),
                       np.concatenate([self.art_feats, other.art_feats], axis=1),
                       self.history.concat(other.history),
                       self.desc.concat(other.desc) if self.desc is not None else None,
                       np.concatenate([self.tod, other.tod]), np.r_[self.day, other.day])

    def pack(self, item_keys: tuple[str, ...], item_ids: np.ndarray | None = None) -> "PackedBatch":
        """One int64 buffer in KJT key-major layout: values, then lengths, then ids and dense. ``item_ids``:
        the article_id feature's values when they differ from the rows' articles (an id left out: 0)."""
        b = len(self)
        desc_vals = self.desc.values if self.desc is not None else np.zeros(0, np.int32)
        nq = b * (1 + len(self.cust_feats)) + len(self.history.values)
        ni = b * (1 + len(self.art_feats)) + len(desc_vals)
        parts = [self.customer, self.cust_feats.reshape(-1), self.history.values,
                 self.article if item_ids is None else np.asarray(item_ids, np.int64), self.art_feats.reshape(-1), desc_vals,
                 np.ones(b * (1 + len(self.cust_feats)), np.int64), self.history.lengths(),
                 np.ones(b * (1 + len(self.art_feats)), np.int64)]
        if self.desc is not None:
            parts.append(self.desc.lengths())
        parts += [self.customer, self.article, np.ascontiguousarray(self.tod).view(np.int64).reshape(-1), self.day]
        return PackedBatch(torch.from_numpy(np.concatenate(parts, dtype=np.int64)), b, nq, ni, item_keys)


@dataclass
class PackedBatch:
    """A batch as one int64 buffer: crossing from a dataloader worker costs one shared-memory segment
    instead of one per tensor (measured: ~3x the batches/s with 2 workers). ``unpack`` makes views."""

    buf: torch.Tensor
    batch: int
    n_query_values: int
    n_item_values: int
    item_keys: tuple[str, ...]
    extra: "PackedBatch | None" = None  # the extra catalogue articles, packed the same way

    def _map(self, fn) -> "PackedBatch":
        return PackedBatch(fn(self.buf), self.batch, self.n_query_values, self.n_item_values, self.item_keys,
                           self.extra._map(fn) if self.extra is not None else None)

    def pin_memory(self) -> "PackedBatch":
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device, non_blocking: bool = False) -> "PackedBatch":
        """One transfer per buffer; unpack on the device afterwards (no host sync: every split is known)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def unpack(self) -> Batch:
        """Views into the buffer."""
        batch = self._unpack_one()
        if self.extra is not None:
            extra = self.extra._unpack_one()
            batch.extra_item, batch.extra_ids = extra.item, extra.article_idx
        return batch

    def _unpack_one(self) -> Batch:
        b, nq, ni = self.batch, self.n_query_values, self.n_item_values
        nqk, nik = len(QUERY_KEYS), len(self.item_keys)
        cuts = np.cumsum([nq, ni, b * nqk, b * nik, b, b, b, b])
        q_val, i_val, q_len, i_len, cust, art, dense, day = torch.tensor_split(self.buf, cuts[:-1].tolist())
        # Values per key, known here without reading the lengths (a device sync on a GPU): one id per row
        # for every key but the last (history on the query side, description tokens on the item side).
        q_counts = [b] * (nqk - 1) + [nq - b * (nqk - 1)]
        desc = self.item_keys[-1] == "desc_tokens"
        i_counts = [b] * (nik - 1) + [ni - b * (nik - 1)] if desc else [b] * nik
        return Batch(
            query=KeyedJaggedTensor(keys=QUERY_KEYS, values=q_val, lengths=q_len, stride=b, length_per_key=q_counts),
            item=KeyedJaggedTensor(keys=list(self.item_keys), values=i_val, lengths=i_len, stride=b,
                                   length_per_key=i_counts),
            query_dense=dense.view(torch.float32).view(b, 2),
            customer_idx=cust, article_idx=art, day=day,
        )


def batch_from_arrays(tables: FeatureTables, customer: np.ndarray, article: np.ndarray, day: np.ndarray,
                      history: Jagged | None = None) -> Batch:
    """A Batch for arbitrary rows (catalogue items, evaluation customers, extra negatives), built the
    same way as streamed batches. Without ``history`` every row's is empty."""
    return packed_from_arrays(tables, customer, article, day, history).unpack()


def packed_from_arrays(tables: FeatureTables, customer: np.ndarray, article: np.ndarray, day: np.ndarray,
                       history: Jagged | None = None, item_ids: np.ndarray | None = None) -> PackedBatch:
    """As :func:`batch_from_arrays`, packed (one buffer to move to a device); ``item_ids`` as in ``pack``."""
    return columns_for(tables, customer, article, day, history).pack(tables.item_keys(), item_ids)


def columns_for(tables: FeatureTables, customer: np.ndarray, article: np.ndarray, day: np.ndarray,
                history: Jagged | None = None) -> Columns:
    customer = np.asarray(customer, np.int32)
    article = np.asarray(article, np.int32)
    history = Jagged.empty(len(customer)) if history is None else history.astype(np.int32)
    desc = Jagged.from_lengths(*tables.desc(article)) if tables.has_desc else None
    return Columns(customer, article, np.take(tables.customer, customer, axis=1),
                   np.take(tables.article, article, axis=1), history, desc,
                   tables.time_of_year(np.asarray(day, np.int64)), np.asarray(day, np.int32))
