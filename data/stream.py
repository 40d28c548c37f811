"""Streaming the example shards: an IterableDataset of columnar TorchRec batches with exact resume.

Units of work are (file, row group). Each epoch, the units are permuted with (seed, epoch) and dealt to
ranks, then to dataloader workers; coverage is complete and disjoint. A worker reads its units in
windows of ``shuffle_rows`` rows, permutes each window (the shards are already globally shuffled by
data.prepare, so a bounded window suffices), and cuts the concatenated stream into batches. Every rank
yields the same number of batches per epoch (computed from the Parquet footers alone), so collectives
never wait on a rank that ran dry; the few rows past the common count are left out and reported by
:meth:`ExampleStream.plan`.

Because the order is a pure function of (seed, epoch, rank, worker) and the footers, the state is just
(epoch, batches done) per worker, and a restore jumps straight to the right window: the batches after
``load_state_dict`` equal the uninterrupted ones. Use :func:`make_loader` (torchdata's
StatefulDataLoader) to get that with ``num_workers > 0``.

A batch holds two KeyedJaggedTensors built straight from numpy columns: the query side (customer id,
customer features, and the purchase history as a jagged bag of article ids) and the item side (article
id and article features, description tokens as a bag), plus dense time-of-year features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from data import features
from data.io import fs_and_path, join, read_json, read_table

log = logging.getLogger(__name__)

EXAMPLE_SCHEMA = pa.schema([
    ("customer_idx", pa.int32()), ("article_idx", pa.int32()), ("day", pa.int32()),
    ("history", pa.list_(pa.int32())),
])
QUERY_KEYS = ["customer_id", *features.CUSTOMER_FEATURES, "history"]


class StreamError(ValueError):
    pass


@dataclass
class Batch(Pipelineable):
    """One training batch; movable to a device as a unit (TorchRec's train pipelines need that)."""

    query: KeyedJaggedTensor
    item: KeyedJaggedTensor
    query_dense: torch.Tensor  # (B, 2): sin, cos of the time of year
    customer_idx: torch.Tensor  # (B,) int64
    article_idx: torch.Tensor  # (B,) int64: the positive item of each row

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(*(getattr(self, f).to(device=device, non_blocking=non_blocking) for f in self._fields()))

    def record_stream(self, stream) -> None:
        for f in self._fields():
            getattr(self, f).record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(*(getattr(self, f).pin_memory() for f in self._fields()))

    @staticmethod
    def _fields() -> tuple[str, ...]:
        return ("query", "item", "query_dense", "customer_idx", "article_idx")

    def __len__(self) -> int:
        return int(self.article_idx.numel())


@dataclass
class Unit:
    file: str
    row_group: int
    rows: int


def discover_units(prepared: str) -> tuple[list[Unit], dict]:
    """All (file, row group) units of the example shards, with checks: a shard that is not Parquet or
    has another schema is an error naming it; an empty shard is skipped and counted."""
    manifest = read_json(join(prepared, "manifest.json"))
    fs, _ = fs_and_path(prepared)
    units, skipped = [], []
    for shard in manifest["examples"]["shards"]:
        url = join(prepared, shard["file"])
        path = fs_and_path(url)[1]
        if not fs.exists(path):
            raise StreamError(f"{url}: example shard listed in manifest.json is missing")
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as e:
            raise StreamError(f"{url}: not a readable Parquet file ({e})") from e
        if not schema.remove_metadata().equals(EXAMPLE_SCHEMA):
            raise StreamError(f"{url}: schema ({_fmt(schema)}) differs from the example schema "
                              f"({_fmt(EXAMPLE_SCHEMA)})")
        if meta.num_rows == 0:
            skipped.append(url)
            continue
        units += [Unit(url, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)
                  if meta.row_group(i).num_rows > 0]
    if skipped:
        log.warning("skipping %d empty example shard(s): %s", len(skipped), skipped)
    if not units:
        raise StreamError(f"{prepared}: no example rows")
    manifest["skipped_empty_shards"] = skipped
    return units, manifest


def _fmt(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


class FeatureTables:
    """Per-id feature lookups held as numpy arrays (dense by index): 22 MB for H&M's customers."""

    def __init__(self, prepared: str, manifest: dict):
        self.cards = manifest["cardinalities"]
        self.customer_features = manifest["customer_features"]
        self.article_features = [f for f in manifest["article_features"] if f != "desc_tokens"]
        self.has_desc = "desc_tokens" in manifest["article_features"]
        for name in ("customers", "articles"):
            url = join(prepared, "features", f"{name}.parquet")
            if not fs_and_path(url)[0].exists(fs_and_path(url)[1]):
                raise StreamError(f"{url}: feature table missing; run data.prepare")
        cust = read_table(join(prepared, "features", "customers.parquet"))
        art = read_table(join(prepared, "features", "articles.parquet"))
        self.customer = self._dense(cust, "customer_idx", self.customer_features, self.cards["customer_id"])
        self.article = self._dense(art, "article_idx", self.article_features, self.cards["article_id"])
        if self.has_desc:
            tokens = art["desc_tokens"].combine_chunks()
            lengths = np.zeros(self.cards["article_id"], dtype=np.int64)
            idx = art["article_idx"].to_numpy()
            lengths[idx] = pa.compute.list_value_length(tokens).to_numpy(zero_copy_only=False)
            # Re-lay token lists in article_idx order so row i's tokens are at offsets[i]:offsets[i+1].
            order = np.argsort(idx)
            self.desc_offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
            self.desc_values = np.concatenate(
                [np.zeros(0, np.int32)] + [np.asarray(tokens.take(pa.array(order)).flatten().to_numpy())]
            ).astype(np.int64)

    @staticmethod
    def _dense(table: pa.Table, key: str, cols: list[str], n: int) -> np.ndarray:
        out = np.zeros((n, len(cols)), dtype=np.int64)  # row 0 (OOV) keeps all-OOV features
        idx = table[key].to_numpy()
        for j, c in enumerate(cols):
            out[idx, j] = table[c].to_numpy()
        return out

    def desc(self, article_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.desc_offsets[article_idx], self.desc_offsets[article_idx + 1]
        lengths = hi - lo
        starts = np.r_[0, np.cumsum(lengths)[:-1]]
        pos = np.arange(lengths.sum()) - np.repeat(starts, lengths) + np.repeat(lo, lengths)
        return lengths, self.desc_values[pos]


def build_batch(tables: FeatureTables, customer: np.ndarray, article: np.ndarray, day: np.ndarray,
                hist_lengths: np.ndarray, hist_values: np.ndarray) -> Batch:
    """Columnar: one numpy gather per feature, then KJTs in key-major layout."""
    b = len(customer)
    ones = np.ones(b, dtype=np.int32)
    cust_feats = tables.customer[customer]  # (B, F)
    q_values = [customer.astype(np.int64)] + [cust_feats[:, j] for j in range(cust_feats.shape[1])] + [
        hist_values.astype(np.int64)]
    q_lengths = [ones] * (1 + cust_feats.shape[1]) + [hist_lengths.astype(np.int32)]
    art_feats = tables.article[article]
    i_keys = ["article_id", *tables.article_features]
    i_values = [article.astype(np.int64)] + [art_feats[:, j] for j in range(art_feats.shape[1])]
    i_lengths = [ones] * len(i_keys)
    if tables.has_desc:
        d_len, d_val = tables.desc(article)
        i_keys.append("desc_tokens")
        i_values.append(d_val)
        i_lengths.append(d_len.astype(np.int32))
    sin, cos = features.time_of_year(day)
    return Batch(
        query=KeyedJaggedTensor(keys=QUERY_KEYS, values=torch.from_numpy(np.concatenate(q_values)),
                                lengths=torch.from_numpy(np.concatenate(q_lengths))),
        item=KeyedJaggedTensor(keys=i_keys, values=torch.from_numpy(np.concatenate(i_values)),
                               lengths=torch.from_numpy(np.concatenate(i_lengths))),
        query_dense=torch.from_numpy(np.stack([sin, cos], axis=1)),
        customer_idx=torch.from_numpy(customer.astype(np.int64)),
        article_idx=torch.from_numpy(article.astype(np.int64)),
    )


@dataclass
class WorkerPlan:
    units: list[Unit]
    quota: int  # batches this worker yields this epoch
    rows: int


class ExampleStream(IterableDataset):
    """See the module docstring. ``state_dict``/``load_state_dict`` resume mid-epoch exactly."""

    def __init__(self, prepared: str, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_rows: int = 65_536, num_workers: int = 1):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.prepared, self.batch_size = prepared, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_rows = shuffle_rows
        self.num_workers = max(1, num_workers)
        self.units, self.manifest = discover_units(prepared)
        self.tables = FeatureTables(prepared, self.manifest)
        self.history_len = self.manifest["history_len"]
        self.epoch, self.batches_done = 0, 0
        self.oov = {"customer_idx": 0, "article_idx": 0, "history": 0}
        self._files: dict[str, pq.ParquetFile] = {}

    # ------------------------------------------------------------ plan (pure function of metadata)

    def plan(self, epoch: int) -> dict[tuple[int, int], WorkerPlan]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        plans = {}
        for r in range(self.world_size):
            rank_units = [self.units[i] for i in order[r::self.world_size]]
            for w in range(self.num_workers):
                us = rank_units[w::self.num_workers]
                rows = sum(u.rows for u in us)
                plans[(r, w)] = WorkerPlan(us, rows // self.batch_size, rows)
        per_rank = [sum(plans[(r, w)].quota for w in range(self.num_workers)) for r in range(self.world_size)]
        common = min(per_rank)
        if common == 0:
            raise StreamError(f"{self.prepared}: too few examples for {self.world_size} rank(s) x "
                              f"{self.num_workers} worker(s) x batch {self.batch_size}")
        for r in range(self.world_size):  # trim the largest quotas until every rank has `common`
            extra = per_rank[r] - common
            while extra > 0:
                w = max(range(self.num_workers), key=lambda w: (plans[(r, w)].quota, -w))
                plans[(r, w)].quota -= 1
                extra -= 1
        return plans

    def batches_per_epoch(self) -> int:
        return sum(p.quota for (r, _), p in self.plan(0).items() if r == self.rank)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done = epoch, 0

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "world_size", "batch_size"):
            if state[k] != getattr(self, k):
                raise StreamError(f"stream state was saved with {k}={state[k]}, this stream has "
                                  f"{getattr(self, k)}; exact resume needs the same value")
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]

    # ------------------------------------------------------------ iteration

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        if n_workers != self.num_workers:
            raise StreamError(f"stream built for num_workers={self.num_workers} but the loader runs "
                              f"{n_workers}; pass the same number to make_loader")
        plan = self.plan(self.epoch)[(self.rank, worker)]
        windows = self._windows(plan.units)
        start_row = self.batches_done * self.batch_size
        # Jump to the window holding start_row: no replay of earlier data.
        w0 = int(np.searchsorted(np.cumsum([sum(u.rows for u in w) for w in windows]), start_row, side="right"))
        skip = start_row - sum(sum(u.rows for u in w) for w in windows[:w0])
        carry: list[dict] = []
        carry_rows = 0
        for wi in range(w0, len(windows)):
            if self.batches_done >= plan.quota:
                break
            cols = self._read_window(windows[wi], wi)
            if skip:
                cols = {k: _slice(v, skip, None) for k, v in cols.items()}
                skip = 0
            carry.append(cols)
            carry_rows += len(cols["customer_idx"])
            if carry_rows < self.batch_size:
                continue
            merged = _concat(carry)
            pos = 0
            while carry_rows - pos >= self.batch_size and self.batches_done < plan.quota:
                part = {k: _slice(v, pos, pos + self.batch_size) for k, v in merged.items()}
                pos += self.batch_size
                self.batches_done += 1  # before yield: a state taken after this batch resumes after it
                yield self._to_batch(part)
            carry = [{k: _slice(v, pos, None) for k, v in merged.items()}]
            carry_rows -= pos
        self.epoch, self.batches_done = self.epoch + 1, 0

    def _windows(self, units: list[Unit]) -> list[list[Unit]]:
        windows, cur, rows = [], [], 0
        for u in units:
            cur.append(u)
            rows += u.rows
            if rows >= self.shuffle_rows:
                windows.append(cur)
                cur, rows = [], 0
        if cur:
            windows.append(cur)
        return windows

    def _read_window(self, units: list[Unit], wi: int) -> dict:
        info = get_worker_info()
        worker = info.id if info else 0
        tables = [self._file(u.file).read_row_group(u.row_group) for u in units]
        t = pa.concat_tables(tables)
        perm = np.random.default_rng([self.seed, self.epoch, self.rank, worker, wi]).permutation(t.num_rows)
        hist = t["history"].combine_chunks()
        offsets = hist.offsets.to_numpy().astype(np.int64)
        values = hist.values.to_numpy()
        lengths = np.diff(offsets)
        cols = {"customer_idx": t["customer_idx"].to_numpy()[perm],
                "article_idx": t["article_idx"].to_numpy()[perm],
                "day": t["day"].to_numpy()[perm]}
        lo, ln = offsets[:-1][perm], lengths[perm]
        new_off = np.r_[0, np.cumsum(ln)]
        pos = np.arange(new_off[-1]) - np.repeat(new_off[:-1], ln) + np.repeat(lo, ln)
        cols["history"] = (ln, values[pos])
        return cols

    def _file(self, url: str) -> pq.ParquetFile:
        f = self._files.get(url)
        if f is None:
            fs, path = fs_and_path(url)
            try:
                f = pq.ParquetFile(fs.open(path, "rb"))
            except (pa.ArrowInvalid, OSError) as e:
                raise StreamError(f"{url}: not a readable Parquet file ({e})") from e
            self._files[url] = f
        return f

    def _to_batch(self, cols: dict) -> Batch:
        c, a = cols["customer_idx"].copy(), cols["article_idx"].copy()
        h_len, h_val = cols["history"]
        h_val = h_val.copy()
        for name, arr, card in (("customer_idx", c, self.tables.cards["customer_id"]),
                                ("article_idx", a, self.tables.cards["article_id"]),
                                ("history", h_val, self.tables.cards["article_id"])):
            bad = (arr < 0) | (arr >= card)
            if bad.any():  # ids outside the vocabulary: OOV row, counted
                self.oov[name] += int(bad.sum())
                arr[bad] = 0
        return build_batch(self.tables, c, a, cols["day"], h_len, h_val)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = {}  # open files do not cross process boundaries
        return state


def _slice(v, lo, hi):
    if isinstance(v, tuple):  # (lengths, values) of a jagged column
        lengths, values = v
        offs = np.r_[0, np.cumsum(lengths)]
        hi_ = len(lengths) if hi is None else hi
        return lengths[lo:hi_], values[offs[lo]:offs[hi_]]
    return v[lo:hi]


def _concat(parts: list[dict]) -> dict:
    if len(parts) == 1:
        return parts[0]
    out = {}
    for k in parts[0]:
        if isinstance(parts[0][k], tuple):
            out[k] = (np.concatenate([p[k][0] for p in parts]), np.concatenate([p[k][1] for p in parts]))
        else:
            out[k] = np.concatenate([p[k] for p in parts])
    return out


def _identity(x):
    return x


def make_loader(stream: ExampleStream, pin_memory: bool = False):
    """A torchdata StatefulDataLoader over the stream: its state_dict() covers every worker's position."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    n = stream.num_workers if stream.num_workers > 1 else 0
    return StatefulDataLoader(stream, batch_size=None, num_workers=n, collate_fn=_identity,
                              pin_memory=pin_memory, persistent_workers=False,
                              prefetch_factor=4 if n else None)
