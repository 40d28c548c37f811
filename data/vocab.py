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


def lookup(values: pa.Array | pa.ChunkedArray, vocab: pa.Table) -> tuple[np.ndarray, int]:
    """Indices of ``values`` (int32, 0 for OOV or null) and how many non-null values were OOV."""
    vocab_values = vocab["value"].combine_chunks() if isinstance(vocab["value"], pa.ChunkedArray) else vocab["value"]
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    if not values.type.equals(vocab_values.type):
        values = values.cast(vocab_values.type)
    pos = pc.index_in(values, value_set=vocab_values)
    idx = pc.fill_null(pc.add(pos, 1), 0).to_numpy(zero_copy_only=False).astype(np.int32)
    oov = int(pc.sum(pc.and_(pc.is_null(pos), pc.is_valid(values))).as_py() or 0)
    return idx, oov


def size(vocab: pa.Table) -> int:
    """Embedding rows the vocabulary needs: its values plus the OOV row."""
    return vocab.num_rows + 1


def stable_hash(values: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """Deterministic hash buckets 1..buckets-1 (0 = null) of strings, across runs and machines.

    Hashes each *distinct* value once in Python (blake2b), then spreads the result to rows with
    index_in, so the per-row work stays columnar.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    values = values.cast(pa.string())
    distinct = pc.unique(pc.drop_null(values))
    hashed = np.fromiter(
        (int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") % (buckets - 1) + 1
         for v in distinct.to_pylist()), dtype=np.int64, count=len(distinct))
    pos = pc.index_in(values, value_set=distinct).to_numpy(zero_copy_only=False)
    out = np.zeros(len(values), dtype=np.int32)
    ok = ~np.isnan(pos) if pos.dtype.kind == "f" else np.ones(len(pos), bool)
    out[ok] = hashed[pos[ok].astype(np.int64)]
    return out


def save(vocab: pa.Table, out: str, name: str) -> None:
    write_parquet(vocab, join(out, "vocab", f"{name}.parquet"))


def load(out: str, name: str) -> pa.Table:
    url = join(out, "vocab", f"{name}.parquet")
    fs, path = fs_and_path(url)
    if not fs.exists(path):
        raise VocabError(f"{url}: vocabulary {name!r} not found; run data.prepare first")
    return read_table(url)
