"""data.prepare on hand-made canonical tables: leakage, exact histories against a naive reference,
eval sets, item frequencies, vocabulary files and the shuffle."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from conftest import prepare_options
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from data import vocab
from data.config import DataConfig, SplitConfig
from data.io import fs_and_path, join, table_url, write_parquet
from data.prepare import prepare
from data.schema import ARTICLES, CUSTOMERS, TRANSACTIONS

D0 = dt.date(2020, 1, 1)
EPOCH_D0 = (D0 - dt.date(1970, 1, 1)).days


def write_dataset(root: str, n_customers: int, n_articles: int, rows: list[tuple[int, int, int]]) -> None:
    """rows: (customer, article, day offset) in file order."""
    cust = pa.table({"customer_id": [f"c{i}" for i in range(n_customers)]})
    cust = pa.table({c.name: (cust["customer_id"] if c.name == "customer_id" else pa.nulls(n_customers, c.type))
                     for c in CUSTOMERS.columns}, schema=CUSTOMERS.schema)
    art = {c.name: pa.nulls(n_articles, c.type) for c in ARTICLES.columns}
    art["article_id"] = pa.array([1000 + i for i in range(n_articles)], pa.int64())
    for c in ARTICLES.columns:
        if not c.nullable and c.name != "article_id":
            art[c.name] = pa.array([c.fill] * n_articles, c.type)
    art["section_no"] = pa.array([i % 3 for i in range(n_articles)], pa.int32())
    write_parquet(cust, table_url(root, "customers"))
    write_parquet(pa.table(art, schema=ARTICLES.schema), table_url(root, "articles"))
    tx = pa.table({
        "t_dat": pa.array([D0 + dt.timedelta(days=d) for _, _, d in rows], pa.date32()),
        "customer_id": [f"c{c}" for c, _, _ in rows],
        "article_id": pa.array([1000 + a for _, a, _ in rows], pa.int64()),
        "price": pa.array([0.01] * len(rows), pa.float32()),
        "sales_channel_id": pa.array([1] * len(rows), pa.int8()),
    }, schema=TRANSACTIONS.schema)
    write_parquet(tx, join(table_url(root, "transactions"), "part-00000.parquet"))


def run(root: str, out: str, split_kw: dict | None = None, **opts) -> dict:
    data = OmegaConf.structured(DataConfig(name="t", root=root))
    return prepare(data, OmegaConf.structured(SplitConfig(**(split_kw or {}))), prepare_options(out, **opts),
                   progress=False)


def examples(out: str) -> list[dict]:
    return pq.read_table(join(out, "examples")).to_pylist()


def naive_history(rows, train_mask, customer_idx, day, n):
    """Last n training articles of the customer strictly before `day`, by (day, file order)."""
    past = [(d, i, a) for i, ((c, a, d), tr) in enumerate(zip(rows, train_mask)) if tr and c == customer_idx and d < day]
    return [a for _, _, a in sorted(past)][-n:]


def test_hand_made_week_split(tmp_path):
    # customer 0 buys on days 0, 0, 3, 8(val); customer 1 on days 1, 8(val), 9(val, same article twice).
    rows = [(0, 0, 0), (0, 1, 0), (1, 2, 1), (0, 2, 3), (0, 3, 8), (1, 0, 8), (1, 4, 9), (1, 4, 9)]
    root, out = str(tmp_path / "d"), str(tmp_path / "p")
    write_dataset(root, 3, 5, rows)
    m = run(root, out, {"val_days": 2}, history_len=2)
    assert m["split"]["val_start"] == str(D0 + dt.timedelta(days=8))
    ex = sorted((e["customer_idx"], e["article_idx"], e["day"] - EPOCH_D0, e["history"]) for e in examples(out))
    # Vocabulary: customer c0 -> 1, c1 -> 2; article 1000+i -> i+1.
    assert ex == [(1, 1, 0, []), (1, 2, 0, []), (1, 3, 3, [1, 2]), (2, 3, 1, [])]
    ev = {r["customer_id"]: r for r in pq.read_table(join(out, "eval", "val.parquet")).to_pylist()}
    assert ev["c0"]["targets"] == [4] and ev["c0"]["history"] == [2, 3] and ev["c0"]["target_article_ids"] == [1003]
    assert ev["c1"]["targets"] == [1, 5] and ev["c1"]["history"] == [3]  # article 4 twice -> once
    assert ev["c1"]["day"] - EPOCH_D0 == 8
    freq = pq.read_table(join(out, "item_freq.parquet"))["count"].to_pylist()
    assert freq == [0, 1, 1, 2, 0, 0]  # OOV row, then articles 0..4 in training only
    assert m["cardinalities"]["customer_id"] == 4 and m["cardinalities"]["article_id"] == 6
    v = vocab.load(out, "article_id")
    assert v["value"].to_pylist() == [1000, 1001, 1002, 1003, 1004] and v["count"].to_pylist() == [1] * 5


def test_week_with_test_period_sees_validation_history(tmp_path):
    rows = [(0, 0, 0), (0, 1, 7), (0, 2, 14)]
    root, out = str(tmp_path / "d"), str(tmp_path / "p")
    write_dataset(root, 1, 3, rows)
    run(root, out, {"val_days": 7, "test_days": 7})
    ev_test = pq.read_table(join(out, "eval", "test.parquet")).to_pylist()[0]
    ev_val = pq.read_table(join(out, "eval", "val.parquet")).to_pylist()[0]
    assert ev_val["history"] == [1] and ev_val["targets"] == [2]
    assert ev_test["history"] == [1, 2] and ev_test["targets"] == [3]  # val is known by the test week
    assert [e["article_idx"] for e in examples(out)] == [1]


def test_unknown_ids_are_dropped_and_counted(tmp_path):
    root, out = str(tmp_path / "d"), str(tmp_path / "p")
    write_dataset(root, 2, 2, [(0, 0, 0), (0, 1, 1), (1, 0, 20)])
    tx = pq.read_table(join(table_url(root, "transactions"), "part-00000.parquet"))
    extra = tx.slice(0, 2).set_column(1, "customer_id", pa.array(["zz", "c0"])).set_column(
        2, "article_id", pa.array([1000, 5], pa.int64())).cast(TRANSACTIONS.schema)
    write_parquet(pa.concat_tables([tx, extra]), join(table_url(root, "transactions"), "part-00000.parquet"))
    m = run(root, out)
    assert m["transactions"]["unknown_customer"] == 1 and m["transactions"]["unknown_article"] == 1
    assert m["transactions"]["kept"] == 3


def test_examples_are_shuffled_across_shards(tmp_path):
    rows = [(c, (c * 7 + k) % 50, k) for c in range(40) for k in range(30)] + [(0, 0, 40)]
    root, out = str(tmp_path / "d"), str(tmp_path / "p")
    write_dataset(root, 40, 50, rows)
    m = run(root, out, {"val_days": 1}, shard_rows=300, row_group_rows=100)
    assert [s["rows"] for s in m["examples"]["shards"]] == [300, 300, 300, 300]
    first = pq.read_table(join(out, "examples", "part-00000.parquet"))
    # customers arrive in sorted order in the file; the first shard must mix them
    assert pc.count_distinct(first["customer_idx"]).as_py() > 30
    assert pq.ParquetFile(join(out, "examples", "part-00000.parquet")).metadata.num_row_groups == 3


log_strategy = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 7), st.integers(0, 20)), min_size=2, max_size=60)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=log_strategy, protocol=st.sampled_from(["week", "leave_last_n", "random"]))
def test_no_leakage_property(tmp_path_factory, rows, protocol):
    """For any log: no evaluation target reaches a training example, and every history (training or
    evaluation) equals the naive 'last N training purchases strictly before the day'."""
    days = {d for _, _, d in rows}
    if protocol == "week" and (max(days) - min(days) < 3):
        return  # the week split needs training days before its validation days
    tmp = tmp_path_factory.mktemp("leak")
    root, out = str(tmp / "d"), str(tmp / "p")
    write_dataset(root, 5, 8, rows)
    split_kw = {"week": {"val_days": 3}, "leave_last_n": {"protocol": "leave_last_n", "n": 1},
                "random": {"protocol": "random", "ratio": 0.3}}[protocol]
    try:
        m = run(root, out, split_kw, history_len=3)
    except ValueError as e:
        assert "no training rows" in str(e)
        return
    cust_vocab = {v: i for v, i in zip(*[vocab.load(out, "customer_id")[k].to_pylist() for k in ("value", "index")])}
    # Reconstruct the split labels from what prepare wrote: the training examples are a multiset of rows.
    rows_idx = [(cust_vocab[f"c{c}"], a + 1, d + EPOCH_D0) for c, a, d in rows]
    ex = examples(out)
    ex_rows = sorted((e["customer_idx"], e["article_idx"], e["day"]) for e in ex)
    evals = {}
    for period in ("val", "test"):
        try:
            evals[period] = pq.read_table(join(out, "eval", f"{period}.parquet")).to_pylist()
        except FileNotFoundError:
            pass
    import numpy as np_

    from data import split as split_mod

    c_arr = np_.array([r[0] for r in rows_idx])
    d_arr = np_.array([r[2] for r in rows_idx])
    a_arr = np_.array([r[1] for r in rows_idx])
    label, _ = split_mod.assign(protocol, c_arr, d_arr, OmegaConf.structured(SplitConfig(**split_kw)), article=a_arr)
    train_mask = label == split_mod.TRAIN
    assert ex_rows == sorted(r for r, t in zip(rows_idx, train_mask) if t)
    held = {(r[0], r[1], r[2]) for r, t in zip(rows_idx, train_mask) if not t}
    assert not held & set(ex_rows)  # no target row is a training example
    for e in ex:
        assert e["history"] == naive_history(rows_idx, train_mask, e["customer_idx"], e["day"], 3)
    for period, table in evals.items():
        for r in table:
            if protocol == "week" and period == "test":
                continue  # covered by test_week_with_test_period_sees_validation_history
            assert r["history"] == naive_history(rows_idx, train_mask, r["customer_idx"], r["day"], 3)
            truth = {a for (c, a, d), t in zip(rows_idx, label) if c == r["customer_idx"] and t == split_mod.PERIODS[period]}
            assert set(r["targets"]) == truth
    assert m["examples"]["rows"] == int(train_mask.sum())


def test_prepare_on_synth_has_no_target_in_training(tiny_prepared):
    out, m = tiny_prepared
    ev = pq.read_table(join(out, "eval", "val.parquet"))
    ex = pq.read_table(join(out, "examples"))
    val_start = (dt.date.fromisoformat(m["split"]["val_start"]) - dt.date(1970, 1, 1)).days
    assert pc.max(ex["day"]).as_py() < val_start
    assert pc.max(pc.list_value_length(ex["history"])).as_py() <= m["history_len"]
    assert ev.num_rows == m["eval"]["val"]["customers"] > 100
    assert m["transactions"]["train"] + m["eval"]["val"]["target_rows"] == m["transactions"]["kept"]


def test_train_days_limits_examples_not_histories(tmp_path):
    rows = [(0, 0, 0), (0, 1, 5), (0, 2, 9), (0, 3, 12)]  # day 12 is validation with val_days=2
    root, out = str(tmp_path / "d"), str(tmp_path / "p")
    write_dataset(root, 1, 4, rows)
    m = run(root, out, {"val_days": 2}, train_days=5)
    ex = examples(out)
    assert [(e["article_idx"], e["day"] - EPOCH_D0, e["history"]) for e in ex] == [(2, 5, [1]), (3, 9, [1, 2])]
    assert m["transactions"]["train"] == 3 and m["transactions"]["train_examples"] == 2


def prepare_and_label(tmp, rows, split_kw: dict, **opts):
    """Prepares ``rows`` with ``split_kw`` and labels them with the split itself, on the prepared indices:
    (out, rows as (customer_idx, article_idx, day), labels), or None when no training row is left."""
    from data import split as split_mod

    root, out = str(tmp / "d"), str(tmp / "p")
    write_dataset(root, 5, 8, rows)
    try:
        run(root, out, split_kw, **opts)
    except ValueError as e:
        assert "no training rows" in str(e)
        return None
    cust_vocab = {v: i for v, i in zip(*[vocab.load(out, "customer_id")[k].to_pylist() for k in ("value", "index")])}
    rows_idx = [(cust_vocab[f"c{c}"], a + 1, d + EPOCH_D0) for c, a, d in rows]
    c_arr, a_arr, d_arr = (np.array([r[k] for r in rows_idx]) for k in (0, 1, 2))
    label, _ = split_mod.assign(split_kw["protocol"], c_arr, d_arr, OmegaConf.structured(SplitConfig(**split_kw)),
                                article=a_arr)
    return out, rows_idx, label


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=log_strategy)
def test_leave_last_one_out_with_test_and_same_day_histories(tmp_path_factory, rows):
    """split=leave_last_n with n=1, test_n=1 and prepare.history_within_day (MovieLens): the last
    interaction is test, the one before validation; a training history is the customer's earlier rows
    by (day, file order), same day included; validation sees every training row, test also the
    validation row. Checked against a naive implementation."""
    from data import split as split_mod

    got = prepare_and_label(tmp_path_factory.mktemp("lloo"), rows, {"protocol": "leave_last_n", "n": 1, "test_n": 1},
                            history_len=3, history_within_day=True)
    if got is None:
        return
    out, rows_idx, label = got

    def before(i, allowed, n=3):  # the customer's allowed rows before row i, by (day, file order)
        c, _, d = rows_idx[i]
        past = [(rows_idx[j][2], j, rows_idx[j][1]) for j in range(len(rows_idx))
                if allowed[j] and rows_idx[j][0] == c and (rows_idx[j][2], j) < (d, i)]
        return [a for *_, a in sorted(past)][-n:]

    train = label == split_mod.TRAIN
    want = sorted((*rows_idx[i], tuple(before(i, train))) for i in range(len(rows_idx)) if train[i])
    got = sorted((e["customer_idx"], e["article_idx"], e["day"], tuple(e["history"])) for e in examples(out))
    assert got == want
    for period, allowed in (("val", train), ("test", label != split_mod.TEST)):
        try:
            table = pq.read_table(join(out, "eval", f"{period}.parquet")).to_pylist()
        except FileNotFoundError:
            assert not (label == split_mod.PERIODS[period]).any()
            continue
        for r in table:  # the query comes after every row it may see
            mine = sorted((rows_idx[j][2], j) for j in range(len(rows_idx))
                          if rows_idx[j][0] == r["customer_idx"] and allowed[j])
            assert r["history"] == [rows_idx[j][1] for _, j in mine][-3:]


def test_null_keys_and_days_are_dropped_and_counted(tmp_path):
    """A transactions shard written by another tool may hold nulls: each dropped row is counted by
    its first reason, and rows read = kept + dropped."""
    root, out = str(tmp_path / "d"), str(tmp_path / "p")
    write_dataset(root, 2, 2, [(0, 0, 0), (0, 1, 1), (1, 0, 20)])
    shard = join(table_url(root, "transactions"), "part-00000.parquet")
    tx = pq.read_table(shard)
    nullable = pa.schema([f.with_nullable(True) for f in TRANSACTIONS.schema])
    extra = pa.table({"t_dat": pa.array([None, tx["t_dat"][0].as_py(), tx["t_dat"][0].as_py()], pa.date32()),
                      "customer_id": pa.array(["c0", None, None]),
                      "article_id": pa.array([1, 1, None], pa.int64()),
                      "price": pa.array([0.1, 0.1, 0.1], pa.float32()),
                      "sales_channel_id": pa.array([1, 1, 1], pa.int8())}, schema=nullable)
    pq.write_table(pa.concat_tables([tx.cast(nullable), extra]), fs_and_path(shard)[1])
    t = run(root, out)["transactions"]
    assert (t["missing_t_dat"], t["missing_customer_id"], t["missing_article_id"]) == (1, 2, 0)
    assert t["rows_read"] == 6 and t["kept"] == 3
    assert t["rows_read"] == t["kept"] + sum(v for k, v in t.items() if k.startswith(("missing_", "unknown_")))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=log_strategy)
def test_holdout_with_unordered_histories(tmp_path_factory, rows):
    """split=holdout with prepare.history_order=none: a training example's history is min(3, others) of
    the customer's other training interactions (never the example itself, any day); validation queries
    draw from training, test queries from training + validation. Checked as multisets against the labels."""
    from collections import Counter

    from data import split as split_mod

    got = prepare_and_label(tmp_path_factory.mktemp("holdout"), rows,
                            {"protocol": "holdout", "test_ratio": 0.3, "n": 1}, history_len=3, history_order="none")
    if got is None:
        return
    out, rows_idx, label = got
    train = label == split_mod.TRAIN

    def pool(customer, allowed):
        return Counter(a for (c, a, _), ok in zip(rows_idx, allowed) if ok and c == customer)

    ex = examples(out)
    assert sorted((e["customer_idx"], e["article_idx"], e["day"]) for e in ex) == \
        sorted(r for r, t in zip(rows_idx, train) if t)
    for e in ex:
        others = pool(e["customer_idx"], train) - Counter([e["article_idx"]])
        assert len(e["history"]) == min(3, sum(others.values()))
        assert not Counter(e["history"]) - others  # drawn from the others, each at most as often
    for period, allowed in (("val", train), ("test", label != split_mod.TEST)):
        try:
            table = pq.read_table(join(out, "eval", f"{period}.parquet")).to_pylist()
        except FileNotFoundError:
            assert not (label == split_mod.PERIODS[period]).any()
            continue
        for r in table:
            known = pool(r["customer_idx"], allowed)
            assert len(r["history"]) == min(3, sum(known.values())) and not Counter(r["history"]) - known
            truth = {a for (c, a, _), t in zip(rows_idx, label)
                     if c == r["customer_idx"] and t == split_mod.PERIODS[period]}
            assert set(r["targets"]) == truth


def test_history_window_follows_the_customers_counts(tmp_path):
    """prepare.history_quantile: the window is that quantile of the customers' training counts, rounded up
    and capped; the examples' histories reach it (customer 0's 10th purchase sees 3 before it)."""
    from types import SimpleNamespace

    from data.prepare import history_window

    customers = np.repeat([0, 1, 2, 3], [10, 1, 2, 3])
    n, report = history_window(customers, SimpleNamespace(history_len=20, history_quantile=0.5, history_cap=200))
    assert n == 3 and report["median_customer"] == 2.5  # quantile(1, 2, 3, 10; 0.5) = 2.5 -> 3
    assert report["share_of_training_within"] == round((3 + 1 + 2 + 3) / 16, 4)
    assert history_window(customers, SimpleNamespace(history_len=20, history_quantile=0.5, history_cap=2))[0] == 2
    assert history_window(customers, SimpleNamespace(history_len=7, history_quantile=0.0, history_cap=2))[0] == 7
    root, out = str(tmp_path / "d"), str(tmp_path / "p")
    write_dataset(root, 4, 8, [(0, a % 8, a) for a in range(10)] + [(1, 0, 1), (2, 1, 1), (2, 2, 2),
                                                                   (3, 3, 1), (3, 4, 2), (3, 5, 3)])
    m = run(root, out, {"val_days": 1}, history_len=20, history_quantile=0.5)
    assert m["history_len"] == 3 and max(len(e["history"]) for e in examples(out)) == 3
