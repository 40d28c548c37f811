"""The generator: contract, exact sizes, determinism, H&M-like marginals and the planted structure.

Every statistic is recomputed here from the written Parquet with plain numpy/pyarrow, independently of
the generator's internals.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.config import SynthConfig
from data.io import read_articles, read_customers, read_table
from data.schema import TRANSACTIONS
from data.synth import generate, hex_ids


def load(root: str):
    tx = read_table(f"{root}/transactions", TRANSACTIONS)
    return tx, read_customers(root), read_articles(root)


def codes(values: pa.ChunkedArray | pa.Array, vocab: pa.Array) -> np.ndarray:
    return pc.index_in(values, value_set=vocab).to_numpy(zero_copy_only=False)


def test_exact_sizes_and_contract(tiny_synth):
    root, summary = tiny_synth
    tx, cust, art = load(root)  # load() checks the schemas
    cfg = SynthConfig()
    assert (tx.num_rows, cust.num_rows, art.num_rows) == (cfg.n_transactions, cfg.n_customers, cfg.n_articles)
    assert summary["transactions"] == cfg.n_transactions
    assert pc.count_distinct(cust["customer_id"]).as_py() == cfg.n_customers
    assert pc.count_distinct(art["article_id"]).as_py() == cfg.n_articles
    assert pc.all(pc.match_substring_regex(cust["customer_id"], "^[0-9a-f]{64}$")).as_py()
    # H&M's id structure: article_id = product_code * 1000 + variant.
    assert pc.all(pc.equal(pc.divide(art["article_id"], 1000), pc.cast(art["product_code"], pa.int64()))).as_py()
    days = tx["t_dat"].cast(pa.int32()).to_numpy()
    assert str(pc.min(tx["t_dat"])) == cfg.start_date and days.max() - days.min() < 7 * cfg.n_weeks
    assert np.all(np.diff(days) >= 0)  # date order, as in transactions_train.csv
    assert pc.all(pc.is_in(tx["customer_id"], value_set=cust["customer_id"])).as_py()
    assert pc.all(pc.is_in(tx["article_id"], value_set=art["article_id"])).as_py()
    price = tx["price"].to_numpy()
    assert np.all(np.isfinite(price)) and price.min() > 0
    assert set(pc.unique(tx["sales_channel_id"]).to_pylist()) == {1, 2}
    assert pc.count_distinct(art["section_name"]).as_py() == cfg.n_styles


def test_deterministic_and_seed_sensitive(tmp_path):
    small = dataclasses.replace(SynthConfig(), n_customers=300, n_articles=120, n_transactions=5000, n_weeks=8)
    generate(small, str(tmp_path / "a"), progress=False)
    generate(dataclasses.replace(small, shard_rows=777), str(tmp_path / "b"), progress=False)
    generate(dataclasses.replace(small, seed=1), str(tmp_path / "c"), progress=False)
    a, b, c = (load(str(tmp_path / x)) for x in "abc")
    for ta, tb in zip(a, b):
        assert ta.equals(tb)  # same seed: identical, however the output is sharded
    assert len(pq.ParquetDataset(str(tmp_path / "b" / "transactions")).files) == 7
    assert not a[0].equals(c[0]) and not a[1].equals(c[1])


def test_hex_ids_are_valid_hex():
    ids = hex_ids(np.random.default_rng(0), 1000, nbytes=4).to_pylist()
    assert all(len(i) == 8 and int(i, 16) >= 0 for i in ids) and len(set(ids)) > 990


def test_popularity_is_heavy_tailed_and_drifts(tiny_synth):
    root, _ = tiny_synth
    tx, _, art = load(root)
    a = codes(tx["article_id"], art["article_id"])
    counts = np.sort(np.bincount(a, minlength=art.num_rows))[::-1]
    top_decile_share = counts[: art.num_rows // 10].sum() / counts.sum()
    assert top_decile_share > 0.45  # uniform would be 0.10
    week = (tx["t_dat"].cast(pa.int32()).to_numpy() - tx["t_dat"].cast(pa.int32()).to_numpy().min()) // 7

    def top(weeks, k=25):
        return set(np.argsort(-np.bincount(a[np.isin(week, weeks)], minlength=art.num_rows))[:k])

    early, late = top([0, 1, 2, 3]), top([22, 23, 24, 25])
    neighbour = top([4, 5, 6, 7])
    assert len(early & late) / 25 < 0.5  # the best sellers change over half a year...
    assert len(early & neighbour) > len(early & late)  # ...gradually


def test_customer_activity_is_heavy_tailed(tiny_synth):
    root, _ = tiny_synth
    tx, cust, _ = load(root)
    per_customer = np.sort(np.bincount(codes(tx["customer_id"], cust["customer_id"]), minlength=cust.num_rows))[::-1]
    assert per_customer[: cust.num_rows // 10].sum() / per_customer.sum() > 0.3
    assert (per_customer == 0).sum() > 0  # some customers never buy, as in H&M


def repurchase_share(tx: pa.Table, cust: pa.Table, art: pa.Table) -> float:
    """Share of rows whose (customer, article) was bought on an earlier day: a naive reference."""
    c = codes(tx["customer_id"], cust["customer_id"]).astype(np.int64)
    a = codes(tx["article_id"], art["article_id"]).astype(np.int64)
    d = tx["t_dat"].cast(pa.int32()).to_numpy()
    first_day = {}
    for ci, ai, di in zip(c.tolist(), a.tolist(), d.tolist()):
        first_day.setdefault((ci, ai), di)
    return float(np.mean([first_day[(ci, ai)] < di for ci, ai, di in zip(c.tolist(), a.tolist(), d.tolist())]))


def test_repurchase_rate_follows_config(tmp_path):
    # A catalogue large against each customer's purchases, so accidental repeats stay a minority.
    base = dataclasses.replace(SynthConfig(), n_customers=2000, n_articles=3000, n_transactions=20_000, n_weeks=12)
    rates = {}
    for r in (0.0, 0.12, 0.25):
        root = str(tmp_path / f"r{r}")
        generate(dataclasses.replace(base, repurchase_rate=r), root, progress=False)
        rates[r] = repurchase_share(*load(root))
    assert rates[0.0] < rates[0.12] < rates[0.25]
    assert rates[0.25] - rates[0.0] > 0.08  # most planted repurchases land on an earlier day
    assert rates[0.0] < 0.25


def test_channel_share(tiny_synth):
    tx, _, _ = load(tiny_synth[0])
    online = pc.mean(pc.equal(tx["sales_channel_id"], 2).cast(pa.float64())).as_py()
    assert 0.55 < online < 0.85


def test_planted_age_structure(tiny_synth):
    """Customer age predicts the target age of the styles they buy (from the documented truth)."""
    root, _ = tiny_synth
    tx, cust, _ = load(root)
    truth = pq.read_table(f"{root}/_truth/articles.parquet")
    age = cust["age"].to_numpy(zero_copy_only=False).astype(float)[codes(tx["customer_id"], cust["customer_id"])]
    age_mu = truth["age_mu"].to_numpy()[codes(tx["article_id"], truth["article_id"])]
    ok = ~np.isnan(age)
    assert np.corrcoef(age[ok], age_mu[ok])[0, 1] > 0.4


def test_features_and_history_beat_popularity(tiny_synth):
    """On the last week, a predictor from public columns only (age bucket or the customer's most bought
    section, then popularity inside it) hits far more than global popularity: the plant is learnable."""
    hits = planted_hits(tiny_synth[0])
    assert hits["age_bucket"] > 1.2 * hits["popularity"], hits
    assert hits["history_section"] > 1.6 * hits["popularity"], hits


def planted_hits(root: str) -> dict:
    tx, cust, art = load(root)
    c = codes(tx["customer_id"], cust["customer_id"])
    a = codes(tx["article_id"], art["article_id"])
    day = tx["t_dat"].cast(pa.int32()).to_numpy()
    test = day >= day.max() - 6
    recent = ~test & (day >= day.max() - 6 - 28)
    section = codes(art["section_name"], pc.unique(art["section_name"]))
    n_sec = section.max() + 1
    age = cust["age"].to_numpy(zero_copy_only=False).astype(float)
    bucket = np.where(np.isnan(age), 0, np.digitize(age, [25, 35, 45, 55]) + 1)

    def top12(mask):
        return np.argsort(-np.bincount(a[mask], minlength=art.num_rows), kind="stable")[:12]

    glob = top12(recent)
    by_bucket = {b: top12(recent & (bucket[c] == b)) for b in np.unique(bucket)}
    by_section = {s: top12(recent & (section[a] == s)) for s in range(n_sec)}
    hist_sec = {}
    for ci in np.unique(c[test]):
        h = section[a[(c == ci) & ~test]]
        if len(h):
            hist_sec[ci] = np.bincount(h, minlength=n_sec).argmax()
    targets = {}
    for ci, ai in zip(c[test].tolist(), a[test].tolist()):
        targets.setdefault(ci, set()).add(ai)
    hits = {"popularity": 0, "age_bucket": 0, "history_section": 0}
    for ci, truth in targets.items():
        hits["popularity"] += len(truth & set(glob.tolist()))
        hits["age_bucket"] += len(truth & set(by_bucket[bucket[ci]].tolist()))
        if ci in hist_sec:
            hits["history_section"] += len(truth & set(by_section[hist_sec[ci]].tolist()))
    return hits
