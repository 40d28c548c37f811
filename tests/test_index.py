"""FAISS IVF against exact search, save/load, parameter rules, and the GPU path when there is one."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.retrieval import ivf as ix


def clustered(n: int, d: int, centers: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d))
    x = c[rng.integers(0, centers, n)] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq"])
def test_ivf_recall_against_exact(kind):
    items, queries = clustered(6000, 32, 50), clustered(300, 32, 50, seed=1)
    index = ix.build(items, kind=kind, use_gpu=False)
    assert index.nlist == ix.default_nlist(6000) == 153  # capped: 6000 // 39
    assert ix.default_nlist(105_542) == 2598  # 8 * sqrt(105542) = 2598.9, under 105542 // 39 = 2706
    rows = ix.sweep(index, items, queries, k=12, nprobes=(1, 8, 64))
    recall = [r["recall@12"] for r in rows]
    assert recall == sorted(recall)  # more probes, more recall
    floor = 0.95 if kind == "ivf_flat" else 0.6  # PQ codes approximate the vectors themselves
    assert recall[-1] >= floor
    exact = ix.exact_top_k(items, queries, 12)
    index.nprobe = index.nlist  # every list probed: IVF-Flat is then exact
    if kind == "ivf_flat":
        assert ix.recall_vs_exact(index.search(queries, 12)[1], exact) == 1.0


def test_recall_vs_exact_by_hand():
    assert ix.recall_vs_exact(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 9], [7, 8, 9]])) == pytest.approx(2 / 6)


def test_choose_nprobe_meets_target():
    rows = [{"nprobe": 1, "recall@12": 0.7}, {"nprobe": 4, "recall@12": 0.96}, {"nprobe": 16, "recall@12": 0.99}]
    assert ix.choose_nprobe(rows, 0.95) == 4 and ix.choose_nprobe(rows, 0.999) == 16


def test_training_sample_rule():
    with pytest.raises(ValueError, match="39 x nlist"):
        ix.build(clustered(1000, 8, 10), nlist=100, use_gpu=False)


def test_save_load_round_trip(tmp_path):
    items = clustered(2000, 16, 20)
    index = ix.build(items, use_gpu=False)
    index.nprobe = 8
    ids = np.arange(2000) * 1000 + 108775001
    ix.save(index, ids, str(tmp_path), {"nprobe": 8})
    back, back_ids = ix.load(str(tmp_path))
    back.nprobe = 8
    q = clustered(50, 16, 20, seed=3)
    assert np.array_equal(back.search(q, 5)[1], index.search(q, 5)[1])
    assert np.array_equal(back_ids, ids)


@pytest.mark.gpu
@pytest.mark.skipif(not ix.gpu_available(), reason="faiss has no GPU support here, or no GPU is present")
def test_gpu_build_matches_cpu_recall():
    items, queries = clustered(20000, 32, 100), clustered(500, 32, 100, seed=2)
    gpu = ix.build(items, use_gpu=True)
    rows = ix.sweep(gpu, items, queries, nprobes=(32,))
    assert rows[0]["recall@12"] >= 0.9
