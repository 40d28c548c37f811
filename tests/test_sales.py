"""Recent sales as a score bonus, against a naive per-row reference from the raw transactions."""

from __future__ import annotations

import datetime as dt
import math
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data.prepare import recent_sales
from trainer.model.sales import RecentSales, SalesTerm, buckets_of


def naive_bucket(count: int, n_buckets: int) -> int:
    return 0 if count == 0 else min(math.ceil(2 * math.log2(1 + count)), n_buckets - 1)


def test_buckets_by_hand():
    assert buckets_of(np.array([0, 1, 2, 3, 7, 1000, 10**6]), 32).tolist() == [0, 2, 4, 4, 6, 20, 31]


@pytest.fixture
def sales_setup(tmp_path):
    """Purchases over 5 weeks; the last training day is 2020-03-02 (a Monday), training ends the day after."""
    rng = np.random.default_rng(0)
    n_items, n = 12, 400
    first = np.datetime64("2020-01-28", "D").astype(np.int64)
    d = rng.integers(first, first + 35, n)
    a = rng.integers(1, n_items, n)
    train = d < first + 34  # the last day is not training (the evaluation period)
    info = recent_sales(a, d, train)
    pq.write_table(info.pop("table"), tmp_path / "item_week_sales.parquet")
    manifest = {"recent_sales": info, "cardinalities": {"article_id": n_items}}
    return tmp_path, manifest, a, d, train


def naive_sales_before(a, d, train, end: int, item: int, day: int) -> int:
    """Training purchases of ``item`` in the 7-day week before the week holding ``day``, weeks cut at
    ``end`` (the first day after training); days at or after ``end`` read the last 7 training days."""
    week_start = end + 7 * min((day - end) // 7, 0)
    return int(sum(1 for x, y, t in zip(a, d, train) if t and x == item and week_start - 7 <= y < week_start))


def test_a_rows_bonus_is_its_candidates_sales_in_the_week_before(sales_setup):
    root, manifest, a, d, train = sales_setup
    end = int(np.datetime64(manifest["recent_sales"]["train_end"], "D").astype(np.int64))
    assert end == int(d[train].max()) + 1
    sales = RecentSales(str(root), manifest["recent_sales"], manifest["cardinalities"]["article_id"], 8)
    bias = torch.linspace(-1.0, 2.5, 8)
    days = np.array([int(d[train].min()), end - 8, end - 7, end - 1, end, end + 9])
    week = sales.week_of(torch.from_numpy(days))
    q = torch.randn(len(days), 5)
    items = torch.randn(11, 5)
    ids = torch.arange(1, 12)
    got = sales.add_bonus(q @ items.T, week, ids, bias)  # what training adds to the logits
    for r, day in enumerate(days):
        for j, item in enumerate(ids.tolist()):
            count = naive_sales_before(a, d, train, end, item, int(day))
            want = float(q[r] @ items[j]) + float(bias[naive_bucket(count, 8)])
            assert got[r, j].item() == pytest.approx(want, abs=1e-5), (day, item, count)
    # per-row candidates (mined hard negatives): the same bonus
    bonus = got - q @ items.T
    per_row = torch.stack([ids[[2, 7, 7]], ids[[0, 1, 10]]] * 3)[:len(days)]
    want = torch.stack([bonus[r, per_row[r] - 1] for r in range(len(days))])
    assert torch.allclose(sales.add_bonus(torch.zeros(len(days), 3), week, per_row, bias), want, atol=1e-5)
    # scoring (export, validation, recommend): every query as of the first week after training
    scored = sales.query(q) @ sales.item(items, ids, bias).T
    for j, item in enumerate(ids.tolist()):
        bonus = float(bias[naive_bucket(naive_sales_before(a, d, train, end, item, end), 8)])
        assert torch.allclose(scored[:, j], q @ items[j] + bonus, atol=1e-5)
    # the model's typed term (TwoTower.sales) does the same from the rows' days, in logit units
    term = SalesTerm(8).attach(sales)
    with torch.no_grad():
        term.bias.copy_(bias)
    loss_term = term.loss_term(SimpleNamespace(day=torch.from_numpy(days)), q, None, scale=2.0)
    assert torch.allclose(loss_term(q @ items.T, ids, None), q @ items.T + 2.0 * (got - q @ items.T), atol=1e-5)
    assert torch.allclose(term.scoring_query(q) @ term.scoring_item(items, ids).T, scored, atol=1e-6)
    with pytest.raises(ValueError, match="table of 8 buckets for a term of 4"):
        SalesTerm(4).attach(sales)


def test_missing_recent_sales_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="recent_sales_buckets=0"):
        RecentSales(str(tmp_path), None, 3, 8)
    with pytest.raises(ValueError, match="2..256"):
        (tmp_path / "item_week_sales.parquet").write_bytes(b"")
        RecentSales(str(tmp_path), {"weeks": 1}, 3, 1)


def test_weeks_are_counted_back_from_the_end_of_training():
    a = np.array([1, 1, 2, 2, 2])
    day0 = np.datetime64("2021-06-01", "D").astype(np.int64)
    d = np.array([0, 6, 7, 13, 14]) + day0  # training ends after day 13: days 7..13 are week -1
    info = recent_sales(a, d, np.array([True, True, True, True, False]))
    t = info["table"].to_pydict()
    assert info["train_end"] == str(dt.date(2021, 6, 15)) and info["weeks"] == 2
    assert sorted(zip(t["week"], t["article_idx"], t["count"])) == [(-2, 1, 2), (-1, 2, 2)]


def test_age_buckets_follow_the_first_sale_as_of_each_week():
    from trainer.model.sales import age_buckets_of

    starts = np.array([100, 107, 114, 121])  # the last: scoring's week
    first = np.array([-1, 95, 100, 106, 110, 120, 130, 50])
    got = age_buckets_of(first, starts, 5)
    for r, start in enumerate(starts):
        for a, f in enumerate(first):
            if f < 0:
                want = 1 if r == len(starts) - 1 else 0  # never sold: launching at scoring time, else not in shop
            elif f >= start + 7:
                want = 0
            elif f >= start:
                want = 1
            else:
                want = 1 + min(-(-(start - f) // 7), 3)
            assert got[r, a] == want, (r, a)


def test_at_scoring_only_articles_listed_since_the_parent_launch_the_older_unsold_are_old():
    from trainer.model.sales import age_buckets_of

    starts = np.array([100, 107])  # the last: scoring's week
    first = np.array([-1, -1, 95, -1, -1, 103])  # rows 0..3 held by the parent's vocabulary, 4..5 listed since
    got = age_buckets_of(first, starts, 6, listed_rows=4)
    # scoring week: unsold rows 0, 1, 3 listed a week or more ago (the oldest bucket, 5), unsold row 4 listed
    # since (launching, 1); sold rows by their first sale as without listings (95: 2 weeks; 103: 1 week)
    assert got[-1].tolist() == [5, 5, 1 + 2, 5, 1, 1 + 1]
    assert got[0].tolist() == age_buckets_of(first, starts, 6)[0].tolist()  # training weeks: unchanged
    assert got[-1].tolist() != age_buckets_of(first, starts, 6)[-1].tolist()


def test_an_unsold_listing_is_in_the_shop_from_its_listing_day_aged_by_it():
    from trainer.model.sales import age_buckets_of

    starts = np.array([100, 107, 114, 121])  # the last: scoring's week
    first = np.array([-1, -1, -1, -1, 109, -1])
    listed = np.array([-1, 101, 108, 95, 101, 121])  # row 5 listed since the parent (listed_rows=5)
    got = age_buckets_of(first, starts, 6, listed_rows=5, listed_day=listed)
    # week 100: rows 1 and 4 listed on 101 (launching, unsold), row 3 on 95 (a week before)
    want = [[0, 1, 0, 1 + 1, 1, 0],
            [0, 1 + 1, 1, 1 + 2, 1, 0],  # week 107: row 4 first sold on 109 (by its sale), row 2 listed on 108
            [0, 1 + 2, 1 + 1, 1 + 3, 1 + 1, 0],
            [5, 1 + 3, 1 + 2, 1 + 4, 1 + 2, 1]]  # scoring: row 0 unknown listing (oldest), row 5 launching
    assert got.tolist() == want
    without = age_buckets_of(first, starts, 6, listed_rows=5)
    assert without[0].tolist() == [0, 0, 0, 0, 0, 0]  # without listings an unsold article is not in the shop


def test_an_article_not_in_the_shop_yet_is_no_negative_and_ages_pair_with_sales(sales_setup):
    root, manifest, a, d, train = sales_setup
    n_items = manifest["cardinalities"]["article_id"]
    first = np.full(n_items, -1)
    first[3], first[5] = int(d[train].min()), int(d[train].max())  # 3 sold from the start, 5 on the last day
    sales = RecentSales(str(root), manifest["recent_sales"], n_items, 8, first_sold=first, n_age=4)
    assert sales.n_buckets == 32
    bias = torch.arange(32, dtype=torch.float32)
    early = torch.tensor([int(d[train].min())])
    week = sales.week_of(early)
    out = sales.add_bonus(torch.zeros(1, 3), week, torch.tensor([3, 5, 7]), bias)
    assert out[0, 1] < -1e8 and out[0, 2] < -1e8  # 5 sells weeks later, 7 never: not in the shop yet
    bucket3 = int(sales.table[week[0], 3])
    assert out[0, 0] == bias[bucket3] and bucket3 % 4 == 1  # launching in the first week
    scoring = sales.item(torch.zeros(3, 2), torch.tensor([3, 5, 7]), bias)[:, -1]
    assert (scoring > -1e8).all()  # at scoring time every catalogue article is in the shop


def test_the_launch_boost_lifts_only_the_unsold_launches_and_only_at_scoring(tmp_path):
    rng = np.random.default_rng(1)
    n_items, n = 12, 300
    d = rng.integers(18000, 18035, n)
    a = rng.integers(1, 9, n)  # 9, 10, 11 never sold: 9 listed before the parent, 10 and 11 since
    train = d < 18034
    info = recent_sales(a, d, train)
    pq.write_table(info.pop("table"), tmp_path / "item_week_sales.parquet")
    first = np.full(n_items, -1)
    first[1:9] = [d[train & (a == i)].min() for i in range(1, 9)]
    sales = RecentSales(str(tmp_path), info, n_items, 8, first_sold=first, n_age=4, listed_rows=10)
    plain, boosted = SalesTerm(32, 4), SalesTerm(32, 4, launch_boost=0.25)
    with torch.no_grad():
        for term in (plain, boosted):
            term.bias.copy_(torch.linspace(-1, 1, 32))
            term.attach(sales)
    ids = torch.arange(1, n_items)
    zero = torch.zeros(len(ids), 2)
    gap = boosted.scoring_item(zero, ids)[:, -1] - plain.scoring_item(zero, ids)[:, -1]
    assert gap.tolist() == pytest.approx([0.0] * 9 + [0.25, 0.25])  # rows 10 and 11 only
    assert boosted.new_article_score() == pytest.approx(plain.new_article_score() + 0.25)
    week = sales.week_of(torch.tensor([int(d[train].max())]))
    logits = torch.zeros(1, len(ids))
    assert torch.equal(boosted.loss_term(SimpleNamespace(day=torch.tensor([int(d[train].max())])), None, None, 1.0)(
        logits, ids, None), sales.add_bonus(logits, week, ids, boosted.bias))  # the loss: the learned bias only
    # without a parent the unsold launches and the articles that never sold are one: no boost but an added article's
    alone = RecentSales(str(tmp_path), info, n_items, 8, first_sold=first, n_age=4)
    unboosted = SalesTerm(32, 4, launch_boost=0.25)
    with torch.no_grad():
        unboosted.bias.copy_(torch.linspace(-1, 1, 32))
    unboosted.attach(alone)
    assert torch.equal(unboosted.scoring_item(torch.zeros(len(ids), 2), ids)[:, -1],
                       unboosted.bias[alone.table[-1, ids].long()])
    assert unboosted.new_article_score() == pytest.approx(float(unboosted.bias[1]) + 0.25)
    with pytest.raises(ValueError, match="age_buckets"):
        SalesTerm(8, 0, launch_boost=0.1)
