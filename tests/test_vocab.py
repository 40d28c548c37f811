from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from data import vocab


def test_build_is_sorted_deterministic_with_counts():
    v1 = vocab.build(pa.chunked_array([["b", "a", None], ["c", "a"]]))
    v2 = vocab.build(pa.array(["a", "c", "a", "b"]))
    assert v1.equals(v2)
    assert v1.to_pylist() == [{"value": "a", "index": 1, "count": 2}, {"value": "b", "index": 2, "count": 1},
                              {"value": "c", "index": 3, "count": 1}]
    assert vocab.size(v1) == 4  # + the OOV row


def test_lookup_maps_unknown_and_null_to_oov_and_counts_unknown():
    v = vocab.build(pa.array([10, 20, 30], pa.int64()))
    idx, oov = vocab.lookup(pa.array([30, 10, 99, None, 20], pa.int64()), v)
    assert idx.tolist() == [3, 1, vocab.OOV, vocab.OOV, 2]
    assert oov == 1  # null is missing, not unknown


def test_lookup_casts_to_vocab_type_and_decodes_dictionary():
    v = vocab.build(pa.array(["x", "y"]))
    idx, _ = vocab.lookup(pa.array(["y", "x", "y"]).dictionary_encode(), v)
    assert idx.tolist() == [2, 1, 2]


def test_save_load_round_trip(tmp_path):
    v = vocab.build(pa.array(["a", "b"]))
    vocab.save(v, str(tmp_path), "f")
    assert vocab.load(str(tmp_path), "f").equals(v)
    with pytest.raises(vocab.VocabError, match="vocab/missing.parquet: vocabulary 'missing' not found"):
        vocab.load(str(tmp_path), "missing")


def test_stable_hash_is_deterministic_and_in_range():
    vals = pa.array(["p1", "p2", None, "p1"])
    h = vocab.stable_hash(vals, 97)
    assert h[0] == h[3] and h[2] == 0 and np.all((h[[0, 1, 3]] >= 1) & (h[[0, 1, 3]] < 97))
    assert np.array_equal(h, vocab.stable_hash(pa.array(["p1", "p2", None, "p1"]), 97))
