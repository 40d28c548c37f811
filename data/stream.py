"""Streaming the example shards: an IterableDataset of columnar TorchRec batches.

The order of rows is the epoch's global order (data/shards.py): global batches of ``batch_size`` rows
that depend on the data, the seed and the batch alone. This rank yields its ``batch_size / world_size``
rows of each, in global order, so N ranks train exactly the batches one rank would. A worker reads the
windows that hold its rows on read-ahead threads, keeps its rows and resolves every feature for them
at once, then cuts them into batches.

The position is the number of global batches done in the epoch: ``set_epoch(epoch, start)`` resumes
there exactly, on any number of ranks or loader workers, and the trainer keeps it in its train state
(no per-rank or per-worker loader state to save).

Batches are data/batch.py's (KeyedJaggedTensors built straight from numpy columns); the loader over the
stream is data/loader.py, the per-id feature lookups data/tables.py. With ``extra_rows``, a callable
``(epoch, global batch) -> article ids`` that the trainer hands in (its mixed negatives:
trainer/model/negatives.py ``UniformNegatives``), each batch also carries those catalogue articles as
item-only rows, their features resolved in the loader worker like the batch's own. With ``item_ids``, a
callable ``(epoch, global batch, articles[, the rows' days]) -> id feature values`` (the trainer's id dropout:
trainer/model/cold.py ``IdDropout``), the article_id feature of the batch's item rows is what it returns.
How these become the model's input is the trainer's business (trainer/model/inputs.py); the stream knows features, not models
or losses.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info

from data.batch import Columns, columns_for
from data.io import fs_and_path
from data.jagged import Jagged
from data.shards import EpochPlan, StreamError, Window, discover_units
from data.tables import FeatureTables

log = logging.getLogger(__name__)

class ExampleStream(IterableDataset):
    """See the module docstring. ``batch_size`` is the global batch; this rank yields its
    ``batch_size // world_size`` rows of each. ``set_epoch(epoch, start)`` resumes at global batch ``start``."""

    def __init__(self, prepared: str, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_rows: int = 65_536, num_workers: int = 1, prefetch: int = 2,
                 extra_rows: Callable[[int, int], np.ndarray] | None = None,
                 item_ids: Callable[..., np.ndarray] | None = None):
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
        self.extra_rows = extra_rows  # (epoch, global batch) -> this rank's extra catalogue articles
        self.item_ids = item_ids  # (epoch, global batch, articles[, days]) -> their article_id feature values
        self.units, self.manifest = discover_units(prepared)
        self.tables = FeatureTables(self.manifest)
        self.history_len = self.manifest.history_len
        self.epoch, self.start = 0, 0
        self.oov = {"customer_idx": 0, "article_idx": 0, "history": 0}
        self._files: dict[tuple[int, str], pq.ParquetFile] = {}  # per (thread, file): readers aren't thread-safe
        self._plans: dict[int, EpochPlan] = {}
        self._counts: dict[int, int] = {}  # batches per epoch (a plan is kept for one epoch at a time)
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
        if epoch not in self._counts:
            self._counts[epoch] = self.plan(epoch).batches
        return self._counts[epoch]

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields ``epoch`` from its global batch ``start`` on (a resumed run)."""
        if not 0 <= start <= self.batches_per_epoch(epoch):
            raise StreamError(f"epoch {epoch} has {self.batches_per_epoch(epoch)} batches; cannot start at {start}")
        self.epoch, self.start = epoch, start

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
                    rows, batch = cols.slice(pos, pos + b), int(ids[done])
                    packed = rows.pack(keys, self._item_ids(epoch, batch, rows.article, rows.day))
                    if self.extra_rows is not None:
                        extra = np.asarray(self.extra_rows(epoch, batch), np.int32)
                        packed.extra = columns_for(self.tables, np.zeros(len(extra), np.int32), extra,
                                                   np.zeros(len(extra), np.int64)).pack(
                                                       keys, self._item_ids(epoch, batch, extra))
                    pos += b
                    done += 1
                    yield packed if self.packed else packed.unpack()
                carry = cols.slice(pos)
            if done != len(ids):
                raise StreamError(f"{self.prepared}: epoch {epoch} gave worker {worker} of rank {self.rank} "
                                  f"{done} batches, expected {len(ids)} (did the shards change under the run?)")
        finally:  # also when the consumer stops early: no reader thread outlives the epoch
            pool.shutdown(wait=True, cancel_futures=True)

    def _item_ids(self, epoch: int, batch: int, articles: np.ndarray, days: np.ndarray | None = None):
        if self.item_ids is None:
            return None
        out = self.item_ids(epoch, batch, articles) if days is None else self.item_ids(epoch, batch, articles, days)
        return np.asarray(out, np.int32)

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
        hist = Jagged.from_arrow(t["history"])  # one chunk already: no copy
        oov = {}
        c = _to_oov(c, self.tables.cards["customer_id"], "customer_idx", oov)
        a = _to_oov(a, self.tables.cards["article_id"], "article_idx", oov)
        hist.values = _to_oov(hist.values, self.tables.cards["article_id"], "history", oov)
        tb = self.tables
        desc = Jagged.from_lengths(*tb.desc(a)) if tb.has_desc else None
        return Columns(c, a, np.take(tb.customer, c, axis=1), np.take(tb.article, a, axis=1),
                       hist, desc, tb.time_of_year(day), day.astype(np.int32)), oov

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
