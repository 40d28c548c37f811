"""Reading and writing canonical tables through fsspec URLs (local paths, memory://, s3://, gs://...)."""

from __future__ import annotations

import json
import os
import posixpath
from contextlib import contextmanager
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from data.schema import ARTICLES, CUSTOMERS, TRANSACTIONS, Table, conform


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts)


def table_url(root: str, name: str) -> str:
    """Where a canonical table lives under ``root``: a directory of shards for transactions."""
    return join(root, "transactions") if name == TRANSACTIONS.name else join(root, f"{name}.parquet")


@contextmanager
def atomic_open(url: str, mode: str = "wb"):
    """A file opened for writing under a temporary name and renamed to ``url`` when the block ends
    without an error, so a reader never sees it half-written (atomic where the filesystem renames
    atomically; on object stores an upload appears whole anyway)."""
    fs, path = fs_and_path(url)
    fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with fs.open(tmp, mode) as f:
            yield f
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    fs.mv(tmp, path)


def write_parquet(table: pa.Table, url: str, row_group_size: int | None = None) -> None:
    with atomic_open(url, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size, compression="zstd")


class ShardWriter:
    """Writes a stream of tables as numbered Parquet shards ``part-00000.parquet`` under a directory."""

    def __init__(self, url: str, schema: pa.Schema, shard_rows: int, row_group_size: int = 131_072):
        self.url, self.schema = url, schema
        self.shard_rows, self.row_group_size = shard_rows, row_group_size
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.shards: list[str] = []
        self.rows = 0
        fs, path = fs_and_path(url)
        if fs.exists(path):
            for old in fs.glob(join(path, "part-*.parquet")):
                fs.rm(old)
        fs.makedirs(path, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.shard_rows:
            merged = pa.concat_tables(self._pending)
            self._flush(merged.slice(0, self.shard_rows))
            rest = merged.slice(self.shard_rows)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> list[str]:
        if self._pending_rows:
            self._flush(pa.concat_tables(self._pending))
            self._pending, self._pending_rows = [], 0
        return self.shards

    def _flush(self, table: pa.Table) -> None:
        shard = join(self.url, f"part-{len(self.shards):05d}.parquet")
        write_parquet(table.cast(self.schema), shard, self.row_group_size)
        self.shards.append(shard)
        self.rows += table.num_rows


def list_shards(url: str) -> list[str]:
    """Parquet files directly under ``url``, sorted; full URLs with the protocol kept."""
    fs, path = fs_and_path(url)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{url}: no such directory of Parquet shards")
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    return [fs.unstrip_protocol(p) for p in files]


def read_table(url: str, spec: Table | None = None, columns: list[str] | None = None) -> pa.Table:
    fs, path = fs_and_path(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: not found")
    table = pq.read_table(path, filesystem=fs, columns=columns)  # a file or a directory of shards
    return conform(table, spec, url) if spec is not None and columns is None else table


def iter_transactions(root: str, columns: list[str] | None = None,
                      batch_size: int = 1_000_000) -> Iterator[pa.RecordBatch]:
    """Streams the transactions table shard by shard, checked against the contract."""
    fs, _ = fs_and_path(root)
    for shard in list_shards(table_url(root, TRANSACTIONS.name)):
        with fs.open(fs_and_path(shard)[1], "rb") as f:
            pf = pq.ParquetFile(f)
            _check_schema(pf.schema_arrow, TRANSACTIONS, shard)
            for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
                yield batch


def _check_schema(schema: pa.Schema, spec: Table, where: str) -> None:
    conform(schema.empty_table(), spec, where)


def read_customers(root: str) -> pa.Table:
    return read_table(table_url(root, CUSTOMERS.name), CUSTOMERS)


def read_articles(root: str) -> pa.Table:
    return read_table(table_url(root, ARTICLES.name), ARTICLES)


def write_json(obj: Any, url: str) -> None:
    with atomic_open(url, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def read_json(url: str) -> Any:
    fs, path = fs_and_path(url)
    with fs.open(path, "r") as f:
        return json.load(f)
