"""Metrics against hand-computed cases and the H&M competition's own apk/mapk."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data.jagged import Jagged
from trainer.evaluation.metrics import evaluate


def csr(lists):
    return Jagged.from_lists(lists)


def apk(actual, predicted, k=12):
    """The competition's reference implementation (ml_metrics.average_precision.apk)."""
    if len(predicted) > k:
        predicted = predicted[:k]
    score, num_hits = 0.0, 0.0
    for i, p in enumerate(predicted):
        if p in actual and p not in predicted[:i]:
            num_hits += 1.0
            score += num_hits / (i + 1.0)
    if not actual:
        return 0.0
    return score / min(len(actual), k)


def test_hand_computed_case():
    ranked = np.array([[5, 3, 9, 1], [2, 4, 6, 8], [7, 7, 1, -1]])
    m = evaluate(ranked, csr([[3, 1], [10], [7, 1, 2, 3, 4, 5]]), ks=(2, 4), catalog_size=20, map_k=4)
    # q0: hits at ranks 2 and 4 of 2 relevant; q1: none; q2: hits at 1 (7) and 3 (1), the second 7 is a repeat.
    assert m["recall@2"] == pytest.approx((1 / 2 + 0 + 1 / 6) / 3)
    assert m["recall@4"] == pytest.approx((2 / 2 + 0 + 2 / 6) / 3)
    assert m["hitrate@2"] == pytest.approx(2 / 3)
    ndcg0 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    ndcg2 = (1 + 1 / math.log2(4)) / sum(1 / math.log2(i + 2) for i in range(4))
    assert m["ndcg@4"] == pytest.approx((ndcg0 + 0 + ndcg2) / 3)
    ap0 = (1 / 2 + 2 / 4) / 2
    ap2 = (1 / 1 + 2 / 3) / 4  # fewer than K relevant? no: 6 relevant, so divide by min(6, 4)
    assert m["map@4"] == pytest.approx((ap0 + 0 + ap2) / 3)
    assert m["mrr"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    assert m["coverage"] == pytest.approx(len({5, 3, 9, 1, 2, 4, 6, 8, 7}) / 20)


def test_fewer_relevant_than_k_and_empty_truth():
    ranked = np.array([[4, 2, 0], [1, 2, 3]])
    m = evaluate(ranked, csr([[2], []]), ks=(3,), map_k=3)
    assert m["queries"] == 1 and m["skipped_empty_truth"] == 1
    assert m["map@3"] == pytest.approx(1 / 2)  # one relevant: AP = precision at its rank
    assert m["recall@3"] == 1.0 and m["ndcg@3"] == pytest.approx(1 / math.log2(3))


def test_map12_matches_competition_apk_on_random_lists():
    rng = np.random.default_rng(0)
    ranked = rng.integers(0, 30, size=(200, 12))
    truth = [list(rng.choice(30, size=rng.integers(1, 20), replace=False)) for _ in range(200)]
    m = evaluate(ranked, csr(truth), ks=(12,))
    ref = np.mean([apk(t, list(r)) for t, r in zip(truth, ranked.tolist())])
    assert m["map@12"] == pytest.approx(ref)


def test_drop_seen_keeps_rank_order():
    from trainer.retrieval.search import drop_seen

    ranked = np.array([[5, 3, 9, 1, 7], [2, 4, 6, 8, 1]])
    seen = Jagged(np.array([0, 2, 3]), np.array([3, 1, 8]))  # row 0 bought 3 and 1, row 1 bought 8
    assert drop_seen(ranked, seen, 3).tolist() == [[5, 9, 7], [2, 4, 6]]
