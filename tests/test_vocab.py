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


def grow_reference(parent_values: list, new_values: list) -> dict:
    """A dict-based reference: parent values keep their index; unseen values follow, sorted."""
    index = {v: i + 1 for i, v in enumerate(parent_values)}
    for v in sorted({v for v in new_values if v is not None} - set(index)):
        index[v] = len(index) + 1
    return index


@pytest.mark.parametrize("typ", [pa.string(), pa.int64()])
def test_a_grown_vocabulary_keeps_every_parent_row_and_appends_the_new_values(typ):
    rng = np.random.default_rng(3)
    pool = [f"id{n:03d}" if typ == pa.string() else n * 7 for n in range(300)]
    first = [pool[i] for i in rng.integers(0, 200, 500)]
    later = [pool[i] for i in rng.integers(100, 300, 500)] + [None]  # some old values gone, new ones come
    parent = vocab.build(pa.array(first, typ))
    grown = vocab.grow(parent, pa.chunked_array([pa.array(later[:250], typ), pa.array(later[250:], typ)]))
    want = grow_reference(parent["value"].to_pylist(), later)
    assert dict(zip(grown["value"].to_pylist(), grown["index"].to_pylist())) == want
    assert grown["index"].to_pylist() == list(range(1, len(want) + 1))  # rows in index order, as lookup needs
    assert grown.slice(0, parent.num_rows)["value"].combine_chunks().equals(parent["value"].combine_chunks())
    counts = dict(zip(grown["value"].to_pylist(), grown["count"].to_pylist()))
    assert all(counts[v] == later.count(v) for v in want)  # this data's counts; 0 for a value gone
    idx, oov = vocab.lookup(pa.array(later, typ), grown)
    assert oov == 0 and idx.tolist() == [want.get(v, 0) for v in later]
    again = vocab.grow(grown, pa.array(later, typ))  # growing by nothing new changes no row
    assert again["value"].combine_chunks().equals(grown["value"].combine_chunks())


def test_vocabulary_digests_follow_the_values_in_index_order():
    a = vocab.build(pa.array(["a", "b", "c"]))
    assert vocab.digest(a) == vocab.digest(vocab.build(pa.array(["c", "b", "a", "a"])))  # counts aside
    assert vocab.digest(a) != vocab.digest(vocab.grow(vocab.build(pa.array(["b"])), pa.array(["a", "c"])))
