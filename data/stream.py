"""Streaming the example shards: an IterableDataset of columnar TorchRec batches.

The order of rows is the epoch's global order (data/shards.py): global batches of ``batch_size`` rows
that depend on the data, the seed and the batch alone. This rank yields its ``batch_size / world_size``
rows of each, in global order, so N ranks train exactly the batches one rank would. A worker reads the
windows that hold its rows on read-ahead threads, keeps its rows and resolves every feature for them
at once, then cuts them into batches.

The position is the number of global batches done in the epoch: ``set_epoch(epoch, start)`` resumes
there exactly, on any number of ranks or loader workers, and the trainer keeps it in its train state
(no per-rank or per-worker loader state to save).

A batch holds two KeyedJaggedTensors built straight from numpy columns: the query side (customer id,
customer features, and the purchase history as a jagged bag of article ids) and the item side (article
id and article features, description tokens as a bag), plus dense time-of-year features. With
``extra_items=M`` each global batch also carries M uniformly drawn catalogue articles (the loss's mixed
negatives), drawn from (seed, epoch, global batch); each rank resolves its share of them and the loss
gathers them back. How these become the model's input is the trainer's business (trainer/inputs.py);
the stream knows features, not models.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data import features
from data.io import fs_and_path, join, read_table
from data.shards import EXAMPLE_SCHEMA, EpochPlan, StreamError, Unit, Window, discover_units, shares  # noqa: F401

log = logging.getLogger(__name__)

QUERY_KEYS = ["customer_id", *features.CUSTOMER_FEATURES, "history"]
EXTRA_ITEMS_SALT = 0x6E6567  # keeps the extra-item draws apart from the window permutations


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
    week: torch.Tensor | None = None  # (B,) int64: the row's week for recent sales (FeatureTables.week_index)

    def _map(self, fn) -> "Batch":
        return Batch(*(None if getattr(self, f) is None else fn(getattr(self, f)) for f in self._fields()))

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())

    @staticmethod
    def _fields() -> tuple[str, ...]:
        return ("query", "item", "query_dense", "customer_idx", "article_idx", "extra_item", "extra_ids", "week")

    def __len__(self) -> int:
        return int(self.article_idx.numel())


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
        first = int(np.datetime64(manifest["split"]["first_day"], "D").astype(np.int64))
        last = int(np.datetime64(manifest["split"]["last_day"], "D").astype(np.int64))
        days = np.arange(first - 1, last + 400)
        self._tod = (first - 1, np.stack(features.time_of_year(days), axis=1))
        sales = manifest.get("recent_sales")
        self._sales = None if sales is None else (
            int(np.datetime64(sales["train_end"], "D").astype(np.int64)), int(sales["weeks"]))
        self.customer = self._dense(cust, "customer_idx", self.customer_features, self.cards["customer_id"])
        self.article = self._dense(art, "article_idx", self.article_features, self.cards["article_id"])
        if self.has_desc:  # a list array indexed by article_idx: a batch's tokens are one Arrow take
            n = self.cards["article_id"]
            lengths = np.zeros(n, dtype=np.int64)
            idx = art["article_idx"].to_numpy()
            tokens = art["desc_tokens"].combine_chunks()
            lengths[idx] = pc.list_value_length(tokens).to_numpy(zero_copy_only=False)
            order = np.argsort(idx)
            values = tokens.take(pa.array(order)).flatten() if len(order) else pa.array([], pa.int32())
            # Articles missing from the table (only the OOV row, normally) get no tokens.
            self.desc_lists = pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32)),
                                                       values.cast(pa.int32()))

    @staticmethod
    def _dense(table: pa.Table, key: str, cols: list[str], n: int) -> np.ndarray:
        """(features, ids): feature-major, so a batch's gather lands key-major as KJTs want it."""
        out = np.zeros((len(cols), n), dtype=np.int32)  # column 0 (OOV) keeps all-OOV features
        idx = table[key].to_numpy()
        for j, c in enumerate(cols):
            out[j, idx] = table[c].to_numpy()
        return out

    def time_of_year(self, day: np.ndarray) -> np.ndarray:
        """(B, 2) float32 sin/cos from a per-day table over the data's span (read-only: thread-safe)."""
        lo, table = self._tod
        if len(day) and (day.min() < lo or day.max() >= lo + len(table)):
            return np.stack(features.time_of_year(day), axis=1)
        return table[day - lo]

    def week_index(self, day: np.ndarray) -> np.ndarray:
        """(B,) int32: which row of the recent-sales table a day reads (trainer/popularity.py): ``weeks``
        for the first week after training (evaluation) and later, ``weeks - 1`` for the last training
        week, ..., 0 before the data. All 0 for prepared data without recent sales."""
        if self._sales is None:
            return np.zeros(len(day), np.int32)
        end, weeks = self._sales
        return np.clip((np.asarray(day, np.int64) - end) // 7 + weeks, 0, weeks).astype(np.int32)

    def desc(self, article_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lengths and concatenated tokens of the given articles' descriptions."""
        picked = self.desc_lists.take(pa.array(article_idx))
        offsets = picked.offsets.to_numpy()
        return np.diff(offsets), picked.values.to_numpy()[offsets[0]:offsets[-1]]

    def item_keys(self) -> tuple[str, ...]:
        return ("article_id", *self.article_features, *(("desc_tokens",) if self.has_desc else ()))


@dataclass
class Jagged:
    offsets: np.ndarray  # (n + 1,) int64
    values: np.ndarray  # int32 until packed

    @classmethod
    def from_lengths(cls, lengths: np.ndarray, values: np.ndarray) -> "Jagged":
        return cls(np.r_[0, np.cumsum(lengths)].astype(np.int64), values)

    def slice(self, lo: int, hi: int) -> "Jagged":
        return Jagged(self.offsets[lo:hi + 1] - self.offsets[lo], self.values[self.offsets[lo]:self.offsets[hi]])

    def concat(self, other: "Jagged") -> "Jagged":
        return Jagged(np.r_[self.offsets, other.offsets[1:] + self.offsets[-1]], np.r_[self.values, other.values])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


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
    week: np.ndarray  # (n,) int32

    def __len__(self) -> int:
        return len(self.customer)

    def slice(self, lo: int, hi: int | None = None) -> "Columns":
        hi = len(self) if hi is None else hi
        return Columns(self.customer[lo:hi], self.article[lo:hi], self.cust_feats[:, lo:hi],
                       self.art_feats[:, lo:hi], self.history.slice(lo, hi),
                       self.desc.slice(lo, hi) if self.desc is not None else None, self.tod[lo:hi],
                       self.week[lo:hi])

    def concat(self, other: "Columns") -> "Columns":
        return Columns(np.r_[self.customer, other.customer], np.r_[self.article, other.article],
                       np.concatenate([self.cust_feats, other.cust_feats], axis=1),
                       np.concatenate([self.art_feats, other.art_feats], axis=1),
                       self.history.concat(other.history),
                       self.desc.concat(other.desc) if self.desc is not None else None,
                       np.concatenate([self.tod, other.tod]), np.r_[self.week, other.week])

    def pack(self, item_keys: tuple[str, ...]) -> "PackedBatch":
        """One int64 buffer in KJT key-major layout: values, then lengths, then ids and dense."""
        b = len(self)
        desc_vals = self.desc.values if self.desc is not None else np.zeros(0, np.int32)
        nq = b * (1 + len(self.cust_feats)) + len(self.history.values)
        ni = b * (1 + len(self.art_feats)) + len(desc_vals)
        parts = [self.customer, self.cust_feats.reshape(-1), self.history.values,
                 self.article, self.art_feats.reshape(-1), desc_vals,
                 np.ones(b * (1 + len(self.cust_feats)), np.int64), self.history.lengths(),
                 np.ones(b * (1 + len(self.art_feats)), np.int64)]
        if self.desc is not None:
            parts.append(self.desc.lengths())
        parts += [self.customer, self.article, np.ascontiguousarray(self.tod).view(np.int64).reshape(-1), self.week]
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
        q_val, i_val, q_len, i_len, cust, art, dense, week = torch.tensor_split(self.buf, cuts[:-1].tolist())
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
            customer_idx=cust, article_idx=art, week=week,
        )


class ExampleStream(IterableDataset):
    """See the module docstring. ``batch_size`` is the global batch; this rank yields its
    ``batch_size // world_size`` rows of each. ``set_epoch(epoch, start)`` resumes at global batch ``start``."""

    def __init__(self, prepared: str, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_rows: int = 65_536, num_workers: int = 1, prefetch: int = 2, extra_items: int = 0):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size <= 0 or batch_size % world_size:
            raise StreamError(f"the global batch of {batch_size} rows does not divide over {world_size} rank(s); "
                              f"choose a multiple of {world_size}")
        self.prepared, self.batch_size, self.local_batch = prepared, batch_size, batch_size // world_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_rows = shuffle_rows
        self.prefetch = max(1, prefetch)  # windows read ahead, each on its own thread
        self.num_workers = max(1, num_workers)
        self.extra_items = extra_items  # per global batch; this rank resolves its share
        self.units, self.manifest = discover_units(prepared)
        self.tables = FeatureTables(prepared, self.manifest)
        self.history_len = self.manifest["history_len"]
        self.epoch, self.start = 0, 0
        self.oov = {"customer_idx": 0, "article_idx": 0, "history": 0}
        self._files: dict[tuple[int, str], pq.ParquetFile] = {}  # per (thread, file): readers aren't thread-safe
        self._plans: dict[int, EpochPlan] = {}
        self.packed = False  # make_loader sets it: workers send PackedBatch, the loader unpacks

    # ------------------------------------------------------------ the epoch's global order

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            plan = EpochPlan(self.units, self.seed, epoch, self.shuffle_rows, self.batch_size)
            if plan.batches == 0:
                raise StreamError(f"{self.prepared}: {plan.rows} example rows, fewer than one global batch of "
                                  f"{self.batch_size}")
            self._plans = {epoch: plan}  # one epoch at a time
        return self._plans[epoch]

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """Global batches (steps) in ``epoch``: the same on every rank and at every world size."""
        return self.plan(epoch).batches

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields ``epoch`` from its global batch ``start`` on (a resumed run)."""
        if not 0 <= start <= self.batches_per_epoch(epoch):
            raise StreamError(f"epoch {epoch} has {self.batches_per_epoch(epoch)} batches; cannot start at {start}")
        self.epoch, self.start = epoch, start

    def extra_ids(self, epoch: int, batch: int) -> np.ndarray:
        """This rank's share of the global batch's uniform catalogue articles (1..N-1; 0 is the OOV row):
        drawn for the global batch, so the ranks' shares, gathered in rank order, are the one-rank draw."""
        rng = np.random.default_rng([self.seed, EXTRA_ITEMS_SALT, epoch, batch])
        ids = rng.integers(1, self.tables.cards["article_id"], self.extra_items).astype(np.int32)
        split = shares(self.extra_items, self.world_size)
        lo = sum(split[:self.rank])
        return ids[lo:lo + split[self.rank]]

    # ------------------------------------------------------------ iteration

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        if n_workers != self.num_workers:
            raise StreamError(f"stream built for num_workers={self.num_workers} but the loader runs "
                              f"{n_workers}; pass the same number to make_loader")
        epoch, start = self.epoch, self.start
        plan = self.plan(epoch)
        ids = plan.batch_ids(start, worker, n_workers)
        where = (self.rank, self.world_size, worker, n_workers, start)
        windows = [w for w in plan.windows if plan.touches(w, *where)]
        # Read, permute and resolve the next windows on threads while this one is cut into batches:
        # Arrow and numpy gathers release the GIL, so they overlap. Results are consumed in order.
        pool = ThreadPoolExecutor(max_workers=self.prefetch)
        try:
            ahead = deque(pool.submit(self._window, plan, w, where) for w in windows[:self.prefetch])
            carry: Columns | None = None
            keys, b, done = self.tables.item_keys(), self.local_batch, 0
            for wi in range(len(windows)):
                cols, oov = ahead.popleft().result()
                for k, v in oov.items():
                    self.oov[k] += v
                if wi + self.prefetch < len(windows):
                    ahead.append(pool.submit(self._window, plan, windows[wi + self.prefetch], where))
                cols = carry.concat(cols) if carry is not None and len(carry) else cols
                pos = 0
                while len(cols) - pos >= b:
                    packed = cols.slice(pos, pos + b).pack(keys)
                    if self.extra_items > 0:
                        extra = self.extra_ids(epoch, int(ids[done]))
                        packed.extra = columns_for(self.tables, np.zeros(len(extra), np.int32), extra,
                                                   np.zeros(len(extra), np.int64)).pack(keys)
                    pos += b
                    done += 1
                    yield packed if self.packed else packed.unpack()
                carry = cols.slice(pos)
            if done != len(ids):
                raise StreamError(f"{self.prepared}: epoch {epoch} gave worker {worker} of rank {self.rank} "
                                  f"{done} batches, expected {len(ids)} (did the shards change under the run?)")
        finally:  # also when the consumer stops early: no reader thread outlives the epoch
            pool.shutdown(wait=True, cancel_futures=True)

    def _window(self, plan: EpochPlan, window: Window, where: tuple) -> tuple[Columns, dict]:
        """Reads a window's row groups, keeps this (rank, worker)'s rows in the epoch's order and
        resolves every feature for them."""
        by_file: dict[str, list[int]] = {}
        for u in window.units:  # one multi-threaded read per file
            by_file.setdefault(u.file, []).append(u.row_group)
        t = pa.concat_tables([self._file(f).read_row_groups(rgs) for f, rgs in by_file.items()]).combine_chunks()
        t = t.take(pa.array(plan.rows_for(window, *where)))  # one C++ gather, list column included
        c = t["customer_idx"].to_numpy()
        a = t["article_idx"].to_numpy()
        day = t["day"].to_numpy()
        hist = t["history"].combine_chunks()  # one chunk already: no copy
        h_off = hist.offsets.to_numpy().astype(np.int64)
        h_val = hist.values.to_numpy()[h_off[0]:h_off[-1]]
        oov = {}
        c = _to_oov(c, self.tables.cards["customer_id"], "customer_idx", oov)
        a = _to_oov(a, self.tables.cards["article_id"], "article_idx", oov)
        h_val = _to_oov(h_val, self.tables.cards["article_id"], "history", oov)
        tb = self.tables
        desc = Jagged.from_lengths(*tb.desc(a)) if tb.has_desc else None
        return Columns(c, a, np.take(tb.customer, c, axis=1), np.take(tb.article, a, axis=1),
                       Jagged(h_off - h_off[0], h_val), desc, tb.time_of_year(day), tb.week_index(day)), oov

    def _file(self, url: str) -> pq.ParquetFile:
        key = (threading.get_ident(), url)
        f = self._files.get(key)
        if f is None:
            fs, path = fs_and_path(url)
            try:
                # Local files go through Arrow's own reader (no Python file object in the hot loop).
                f = pq.ParquetFile(path if _is_local(fs) else fs.open(path, "rb"))
            except (pa.ArrowInvalid, OSError) as e:
                raise StreamError(f"{url}: not a readable Parquet file ({e})") from e
            self._files[key] = f
        return f

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = {}  # open files do not cross process boundaries
        return state


def _to_oov(ids: np.ndarray, card: int, name: str, oov: dict) -> np.ndarray:
    """Ids outside [0, card) become the OOV row 0, counted in ``oov``; copies only when needed."""
    bad = (ids < 0) | (ids >= card)
    if not bad.any():
        return ids
    oov[name] = int(bad.sum())
    return np.where(bad, 0, ids).astype(ids.dtype)


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _identity(x):
    return x


def _ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 (Slurm sends them to every process) to the training
    process, which decides when to stop; a worker killed by them would break the final checkpoint."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class BatchLoader:
    """A torch DataLoader over the stream, unpacking batches in the main process. With several workers
    the loader takes their batches round-robin, which is the global order the stream deals them in.
    ``len()`` is the batches of the current epoch. Call ``stream.set_epoch(e[, start])`` before each
    epoch (as with DistributedSampler)."""

    def __init__(self, stream: ExampleStream, pin_memory: bool = False, packed: bool = False):
        self.stream, self.packed = stream, packed
        stream.packed = True
        n = stream.num_workers if stream.num_workers > 1 else 0
        self.loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=n, collate_fn=_identity,
                                                  pin_memory=pin_memory, persistent_workers=False,
                                                  prefetch_factor=4 if n else None,
                                                  worker_init_fn=_ignore_stop_signals if n else None)

    def __iter__(self):
        """Batches, or with ``packed`` the PackedBatch buffers (to move to a device in one copy each).
        Closing the iterator early (a run that stops mid-epoch) shuts its worker processes down; left to
        the interpreter's exit, joining them would hang."""
        it = iter(self.loader)
        try:
            for packed in it:
                yield packed if self.packed else packed.unpack()
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def __len__(self) -> int:
        """Batches of the current epoch."""
        return self.stream.batches_per_epoch(self.stream.epoch) - self.stream.start


def make_loader(stream: ExampleStream, pin_memory: bool = False, packed: bool = False) -> BatchLoader:
    return BatchLoader(stream, pin_memory, packed)


def batch_from_arrays(tables: FeatureTables, customer: np.ndarray, article: np.ndarray, day: np.ndarray,
                      hist_lengths: np.ndarray | None = None, hist_values: np.ndarray | None = None) -> Batch:
    """A Batch for arbitrary rows (catalogue items, evaluation customers, extra negatives), built the
    same way as streamed batches. Missing histories are empty bags."""
    return packed_from_arrays(tables, customer, article, day, hist_lengths, hist_values).unpack()


def packed_from_arrays(tables: FeatureTables, customer: np.ndarray, article: np.ndarray, day: np.ndarray,
                       hist_lengths: np.ndarray | None = None, hist_values: np.ndarray | None = None) -> PackedBatch:
    """As :func:`batch_from_arrays`, packed (one buffer to move to a device)."""
    return columns_for(tables, customer, article, day, hist_lengths, hist_values).pack(tables.item_keys())


def columns_for(tables: FeatureTables, customer: np.ndarray, article: np.ndarray, day: np.ndarray,
                hist_lengths: np.ndarray | None = None, hist_values: np.ndarray | None = None) -> Columns:
    n = len(customer)
    if hist_lengths is None:
        hist_lengths, hist_values = np.zeros(n, np.int64), np.zeros(0, np.int32)
    customer = np.asarray(customer, np.int32)
    article = np.asarray(article, np.int32)
    desc = Jagged.from_lengths(*tables.desc(article)) if tables.has_desc else None
    return Columns(customer, article, np.take(tables.customer, customer, axis=1),
                   np.take(tables.article, article, axis=1),
                   Jagged.from_lengths(np.asarray(hist_lengths), np.asarray(hist_values, np.int32)), desc,
                   tables.time_of_year(np.asarray(day, np.int64)), tables.week_index(np.asarray(day, np.int64)))
