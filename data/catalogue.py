"""What an article is to the item tower, from its catalogue row: the article features (each a column of the
articles table, or several joined) and the hashed words of its description. numpy, pyarrow and hashlib only:
data.prepare builds the feature tables with it, and the serving bundle places articles added to the
catalogue after training with the same code (trainer/serving/bundle.py)."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ARTICLE_FEATURES = {  # feature name -> articles column(s); a value is the combination of its columns
    # H&M numbers each product type and section; MovieLens leaves the numbers at -1 and names them
    # (first genre, decade): the pair keeps both sources' distinctions.
    "product_type": ("product_type_no", "product_type_name"),
    "product_group": "product_group_name",
    "colour_group": "colour_group_code",
    "department": "department_no",
    "index": "index_code",
    "section": ("section_no", "section_name"),
    "garment_group": "garment_group_no",
}


def article_column(articles: pa.Table, feature: str) -> pa.ChunkedArray | pa.Array:
    """The values of an article feature: its column, or its columns joined as text ("253|Vest top")."""
    cols = ARTICLE_FEATURES[feature]
    if isinstance(cols, str):
        return articles[cols]
    parts = [pc.fill_null(pc.cast(articles[c], pa.string()), "") for c in cols]
    return pc.binary_join_element_wise(*parts, "|")


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


def desc_tokens(desc: pa.ChunkedArray | pa.Array, buckets: int, max_tokens: int) -> pa.Array:
    """Lower-cased word tokens of each description, hashed to 1..buckets-1, at most max_tokens each."""
    words = pc.split_pattern_regex(pc.utf8_lower(pc.fill_null(desc, "")), r"[^a-z0-9]+")
    words = pc.list_slice(words, 0, max_tokens) if max_tokens else words
    if isinstance(words, pa.ChunkedArray):
        words = words.combine_chunks()
    flat = pc.list_flatten(words)
    keep = pc.greater(pc.utf8_length(flat), 1)  # drop empty and 1-letter tokens
    hashed = stable_hash(flat, buckets)
    row = pc.list_parent_indices(words).to_numpy()
    keep_np = keep.to_numpy(zero_copy_only=False)
    counts = np.bincount(row[keep_np], minlength=len(words))
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(hashed[keep_np], pa.int32()))


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
