"""The example shards as units of work, and each epoch's global order of rows.

A unit is one Parquet row group of the example shards. Each epoch the units are permuted with (seed,
epoch), grouped into windows of about ``shuffle_rows`` rows, and each window's rows are permuted with
(seed, epoch, window). That sequence, cut every ``batch_size`` rows, is the epoch's **global batches**:
a pure function of the data, the seed and the global batch size, never of the number of ranks or
loader workers. This is what makes a run on N ranks the same training as on one (README, "Scaling
out"): rank r of N trains rows ``[r * B/N, (r + 1) * B/N)`` of every global batch, and loader worker w
of W produces the global batches ``start + w, start + w + W, ...`` (a data loader hands batches out
round-robin over its workers, so the rank sees them in global order). The rows past the last whole
global batch (fewer than ``batch_size``) are left out of that epoch.

The price of a world-size-free order: every (rank, worker) reads the Parquet row groups of the
windows holding its rows, i.e. nearly every window, and keeps its own rows before any feature is
resolved. Decoding the four id columns is the cheap part of the stream (bench/stream.py prints both).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.io import fs_and_path, join
from data.prepared import Prepared

log = logging.getLogger(__name__)

EXAMPLE_SCHEMA = pa.schema([
    ("customer_idx", pa.int32()), ("article_idx", pa.int32()), ("day", pa.int32()),
    ("history", pa.list_(pa.int32())),
])
WINDOW_SALT = 0x77696E  # keeps the window permutations apart from the unit order


class StreamError(ValueError):
    pass


@dataclass(frozen=True)
class Unit:
    file: str
    row_group: int
    rows: int


@dataclass(frozen=True)
class Window:
    index: int
    units: tuple[Unit, ...]
    start: int  # the epoch's global position of the window's first row
    rows: int


def discover_units(prepared: str) -> tuple[list[Unit], Prepared]:
    """All (file, row group) units of the example shards, with checks: a shard that is not Parquet or
    has another schema is an error naming it; an empty shard is skipped and counted."""
    manifest = Prepared.read(prepared)
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
    manifest.raw["skipped_empty_shards"] = skipped
    return units, manifest


def _fmt(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def shares(total: int, world: int) -> list[int]:
    """How ``total`` rows drawn for a global batch (its uniform negatives) split over the ranks, in rank
    order: rank r holds rows ``[r * total // world, (r + 1) * total // world)``."""
    return [(r + 1) * total // world - r * total // world for r in range(world)]


class EpochPlan:
    """One epoch's global order: windows of units, a permutation per window, global batches of
    ``batch_size`` rows. Which rows a (rank, worker) trains is :meth:`rows_for`."""

    def __init__(self, units: list[Unit], seed: int, epoch: int, shuffle_rows: int, batch_size: int):
        self.seed, self.epoch, self.batch_size = seed, epoch, batch_size
        order = np.random.default_rng([seed, epoch]).permutation(len(units))
        windows, cur, rows, start = [], [], 0, 0
        for i in order:
            cur.append(units[i])
            rows += units[i].rows
            if rows >= shuffle_rows:
                windows.append(Window(len(windows), tuple(cur), start, rows))
                start += rows
                cur, rows = [], 0
        if cur:
            windows.append(Window(len(windows), tuple(cur), start, rows))
            start += rows
        self.windows: list[Window] = windows
        self.rows = start
        self.batches = start // batch_size  # global batches; the last rows < batch_size wait for next epoch

    def permutation(self, window: Window) -> np.ndarray:
        """The window's rows (in unit order, as read) in their order of the epoch."""
        return np.random.default_rng([self.seed, WINDOW_SALT, self.epoch, window.index]).permutation(window.rows)

    def batch_ids(self, start: int, worker: int, workers: int) -> np.ndarray:
        """The global batches worker ``worker`` of ``workers`` produces when the epoch resumes at ``start``."""
        return np.arange(start + worker, self.batches, workers)

    def rows_for(self, window: Window, rank: int, world: int, worker: int, workers: int,
                 start: int = 0) -> np.ndarray:
        """Indices into the window's rows (as read) that this (rank, worker) trains, in global order:
        the rank's slice of each of the worker's global batches."""
        pos = window.start + np.arange(window.rows, dtype=np.int64)
        return self.permutation(window)[self._mine(pos, rank, world, worker, workers, start)]

    def touches(self, window: Window, rank: int, world: int, worker: int, workers: int, start: int = 0) -> bool:
        """Whether the window holds any row of this (rank, worker): the others are not read at all."""
        b = self.batch_size
        first, last = window.start // b, (window.start + window.rows - 1) // b
        ids = self.batch_ids(start, worker, workers)
        ids = ids[(ids >= first) & (ids <= last)]
        if not len(ids):
            return False
        local = b // world  # the rank's slice of the first and last batch may fall outside the window
        lo = np.maximum(ids * b + rank * local, window.start)
        hi = np.minimum(ids * b + (rank + 1) * local, window.start + window.rows)
        return bool((hi > lo).any())

    def _mine(self, pos: np.ndarray, rank: int, world: int, worker: int, workers: int, start: int) -> np.ndarray:
        b = self.batch_size
        k = pos // b
        slot = (pos % b) // (b // world)
        return (k >= start) & (k < self.batches) & ((k - start) % workers == worker) & (slot == rank)
