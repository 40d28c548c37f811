"""The three split protocols on hand-made logs with hand-checked answers."""

from __future__ import annotations

import numpy as np
import pytest

from data import split
from data.split import TEST, TRAIN, VAL


def test_week_split_boundaries():
    day = np.array([0, 5, 10, 13, 14, 20, 21, 27])
    label, b = split.week(day, val_days=7, test_days=7)
    # last day 27: test 21..27, validation 14..20, train before 14
    assert label.tolist() == [TRAIN, TRAIN, TRAIN, TRAIN, VAL, VAL, TEST, TEST]
    assert (b["val_start"], b["test_start"]) == (14, 21)
    label, b = split.week(day, val_days=7)
    assert label.tolist() == [TRAIN] * 6 + [VAL, VAL] and b["test_start"] is None


def test_week_split_needs_training_days():
    with pytest.raises(ValueError, match="no training days"):
        split.week(np.array([0, 3, 6]), val_days=7)


def test_leave_last_n():
    #                 customer: 1  1  1  2  2  3  1
    customer = np.array([1, 1, 1, 2, 2, 3, 1])
    day = np.array([5, 1, 9, 4, 4, 2, 9])
    label, _ = split.leave_last_n(customer, day, n=1)
    # customer 1: days 1,5,9,9 -> last by (day, row order) is row 6; customer 2: same day, row 4 is later;
    # customer 3 has a single purchase and stays in training.
    assert label.tolist() == [TRAIN, TRAIN, TRAIN, TRAIN, VAL, TRAIN, VAL]
    label2, _ = split.leave_last_n(customer, day, n=2)
    assert label2.tolist() == [TRAIN, TRAIN, VAL, TRAIN, TRAIN, TRAIN, VAL]  # customer 2 has only 2
    # test_n: the last is test, the one before validation; customer 2 (2 purchases) keeps both
    label3, _ = split.leave_last_n(customer, day, n=1, test_n=1)
    assert label3.tolist() == [TRAIN, TRAIN, VAL, TRAIN, TRAIN, TRAIN, TEST]


def test_random_split_ratio_and_determinism():
    a, _ = split.random(100_000, 0.1, seed=3)
    b, _ = split.random(100_000, 0.1, seed=3)
    c, _ = split.random(100_000, 0.1, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert abs((a == VAL).mean() - 0.1) < 0.005


def test_unknown_protocol():
    with pytest.raises(ValueError, match="split.protocol='weekly'"):
        split.assign("weekly", np.zeros(3), np.zeros(3), None)


def test_identical_rows_stay_together():
    # Two units of article 7 bought by customer 1 on day 9: one interaction, held out together.
    customer, article, day = np.array([1, 1, 1]), np.array([3, 7, 7]), np.array([2, 9, 9])
    label, _ = split.leave_last_n(customer, day, n=1, article=article)
    assert label.tolist() == [TRAIN, VAL, VAL]
    key = split.interaction_key(np.repeat(np.arange(500), 2), np.zeros(1000, int), np.zeros(1000, int))
    label, _ = split.random(1000, 0.5, seed=0, key=key)
    assert np.array_equal(label[0::2], label[1::2]) and 0.4 < (label == VAL).mean() < 0.6


def test_holdout_per_customer_shares():
    """Per customer: round(0.2 x count) (at least one) test interactions and n validation ones, drawn at
    random; a customer with n + 1 interactions or fewer keeps them all; identical rows share a side."""
    customer = np.r_[np.full(10, 1), np.full(2, 2), np.full(5, 3), [4, 4, 4]]
    article = np.r_[np.arange(10), [0, 1], np.arange(5), [8, 8, 9]]  # customer 4: article 8 twice on one day
    day = np.zeros(len(customer), int)
    label, _ = split.holdout(customer, day, article, test_ratio=0.2, n=1, seed=0)
    for c, (n_test, n_val) in {1: (2, 1), 2: (0, 0), 3: (1, 1)}.items():
        mine = label[customer == c]
        assert ((mine == TEST).sum(), (mine == VAL).sum()) == (n_test, n_val), c
    assert label[-3] == label[-2]  # the two identical rows: one interaction (customer 4 has 2: n + 1)
    again, _ = split.holdout(customer, day, article, 0.2, 1, seed=0)
    other = [split.holdout(customer, day, article, 0.2, 1, seed=s)[0] for s in range(1, 6)]
    assert np.array_equal(label, again) and any(not np.array_equal(label, o) for o in other)
    # at scale the test share is the ratio, and every customer keeps a training interaction
    rng = np.random.default_rng(0)
    customer = np.repeat(np.arange(2000), rng.integers(3, 60, 2000))
    article, day = np.arange(len(customer)), np.zeros(len(customer), int)
    label, _ = split.holdout(customer, day, article, 0.2, 1, seed=1)
    assert abs((label == TEST).mean() - 0.2) < 0.02
    assert np.bincount(customer[label == TRAIN], minlength=2000).min() >= 1
    assert np.array_equal(np.bincount(customer[label == VAL], minlength=2000), np.ones(2000))
