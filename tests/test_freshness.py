"""Recall by kind of article and the new-article best-seller list (trainer/evaluation/freshness.py), against
naive loops."""

from __future__ import annotations

from collections import Counter

import numpy as np

from data.jagged import Jagged
from trainer.evaluation import freshness as fresh


def test_recall_by_kind_counts_each_target_pair_as_of_its_customers_day():
    rng = np.random.default_rng(0)
    n_items, n_cust, new_days = 60, 40, 28
    first = rng.integers(-1, 100, n_items)
    first[rng.random(n_items) < 0.2] = -1
    days = rng.integers(60, 100, n_cust)
    lists = [sorted(set(rng.integers(1, n_items, rng.integers(1, 6)).tolist())) for _ in range(n_cust)]
    targets = Jagged.from_lists(lists)
    ranked = np.stack([rng.permutation(np.arange(1, n_items))[:12] for _ in range(n_cust)])
    kinds = fresh.pair_kinds(first, targets, days, new_days)
    got = fresh.recall_by_kind(ranked, targets, kinds, 12, new_days)
    hits, pairs = Counter(), Counter()
    for c, items in enumerate(lists):
        for a in items:
            f, d = first[a], days[c]
            kind = "never_sold" if f < 0 or f >= d else "new_28d" if f >= d - new_days else "older"
            pairs[kind] += 1
            hits[kind] += int(a in ranked[c].tolist())
    assert set(got) == {"never_sold", "new_28d", "older"}
    for kind in got:
        assert got[kind]["pairs"] == pairs[kind] > 0
        assert got[kind]["recall@12"] == hits[kind] / pairs[kind]


def test_the_new_article_best_sellers_are_the_last_weeks_best_sellers_among_recent_launches():
    rng = np.random.default_rng(1)
    n_items, before = 50, 200
    first = rng.integers(100, 200, n_items)
    first[0] = 150  # the OOV row is never listed
    article = rng.integers(0, n_items, 3000)
    day = rng.integers(150, before, 3000)
    got = fresh.new_best_sellers(article, day, first, before, 28, k=12)
    counts = Counter(a for a, d in zip(article.tolist(), day.tolist()) if before - 7 <= d < before
                     and before - 28 <= first[a] < before and a != 0)
    want = [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:12]
    assert got.tolist() == want
