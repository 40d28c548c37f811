"""bench/movielens.py's own scoring (it checks the project's rows independently of trainer/evaluation)."""

from __future__ import annotations

import math
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
from movielens import score  # noqa: E402


def test_multi_item_recall_and_ndcg_by_hand():
    """User 1: test items {3, 7, 8}, ranked 5, 3, 9, 7: top 2 holds one of three (recall 1/3; DCG 1/log2(3)
    over the ideal 1 + 1/log2(3)); top 4 holds two (DCG + 1/log2(5), the ideal over three hits). User 2: one
    item, ranked first: recall 1, NDCG 1. The means over the two users."""
    ranked = {1: [5, 3, 9, 7], 2: [4, 1, 2, 6]}
    got = score(ranked, {1: {3, 7, 8}, 2: 4}, ks=(2, 4))
    ideal2, ideal4 = 1 + 1 / math.log2(3), 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert got["recall@2"] == pytest.approx((1 / 3 + 1) / 2)
    assert got["ndcg@2"] == pytest.approx(((1 / math.log2(3)) / ideal2 + 1) / 2)
    assert got["recall@4"] == pytest.approx((2 / 3 + 1) / 2)
    assert got["ndcg@4"] == pytest.approx(((1 / math.log2(3) + 1 / math.log2(5)) / ideal4 + 1) / 2)
