"""Vocabularies: raw value -> contiguous int, built and applied with pyarrow.compute.

Index 0 is the out-of-vocabulary (and missing) bucket. A vocabulary built afresh numbers its values 1..n in
sorted order of the raw value, so it depends only on the set of values it was built from. A vocabulary
grown from a parent's (``grow``) keeps every parent value at its row and appends the new values after them
(sorted among themselves): a row never changes meaning within a lineage. Saved as Parquet (``value``,
``index``, ``count``) next to the example shards, rows in index order.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.catalogue import lookup, stable_hash  # noqa: F401  (re-exported)
from data.io import fs_and_path, join, read_table, write_parquet

OOV = 0


class VocabError(FileNotFoundError):
    pass


def build(values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Sorted distinct non-null values with their counts; index 1..n (0 is OOV)."""
    counts = pc.value_counts(pc.drop_null(values))
    if isinstance(counts, pa.ChunkedArray):
        counts = counts.combine_chunks()
    value, count = counts.field("values"), counts.field("counts")
    order = pc.sort_indices(value)
    return pa.table({
        "value": value.take(order),
        "index": pa.array(np.arange(1, len(value) + 1, dtype=np.int32)),
        "count": count.take(order),
    })


def grow(parent: pa.Table, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """``parent``'s rows unchanged (their counts now those in ``values``, 0 when absent), then the values
    the parent lacks, sorted, numbered from the parent's last index + 1."""
    fresh = build(values)
    old = _combined(parent["value"])
    new_values = _combined(fresh["value"])
    if not new_values.type.equals(old.type):
        new_values = new_values.cast(old.type)
    known = pc.is_in(new_values, value_set=old)
    added = pc.invert(known)
    pos = pc.index_in(old, value_set=new_values)  # each parent value's row in ``fresh``, null if absent now
    counts = _combined(pc.fill_null(pc.take(_combined(fresh["count"]), pos), 0))
    n_parent = parent.num_rows
    extra = pc.filter(new_values, added)
    return pa.table({
        "value": pa.concat_arrays([old, extra]),
        "index": pa.array(np.arange(1, n_parent + len(extra) + 1, dtype=np.int32)),
        "count": pa.concat_arrays([counts.cast(pa.int64()), pc.filter(_combined(fresh["count"]), added).cast(pa.int64())]),
    })


def digest(vocab: pa.Table) -> str:
    """SHA-256 of the values in index order (Arrow IPC bytes of the one column): equal vocabularies,
    equal digests, wherever they were built."""
    values = _combined(vocab["value"])
    sink = io.BytesIO()
    batch = pa.record_batch([values], names=["value"])
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def _combined(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def size(vocab: pa.Table) -> int:
    """Embedding rows the vocabulary needs: its values plus the OOV row."""
    return vocab.num_rows + 1


def save(vocab: pa.Table, out: str, name: str) -> None:
    write_parquet(vocab, join(out, "vocab", f"{name}.parquet"))


def load(out: str, name: str) -> pa.Table:
    url = join(out, "vocab", f"{name}.parquet")
    fs, path = fs_and_path(url)
    if not fs.exists(path):
        raise VocabError(f"{url}: vocabulary {name!r} not found; run data.prepare first")
    return read_table(url)
