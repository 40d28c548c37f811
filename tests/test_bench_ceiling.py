"""bench/ceiling.py: the regenerated generator state is the dataset's, and its ranking is sane."""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ceiling  # noqa: E402

from data import synth  # noqa: E402
from data.config import SynthConfig  # noqa: E402
from data.jagged import Jagged  # noqa: E402
from trainer.evaluate import load_eval  # noqa: E402
from trainer.evaluation import baselines as bl  # noqa: E402
from trainer.evaluation.metrics import evaluate as metrics  # noqa: E402


def test_regenerated_state_reproduces_the_last_week(tiny_synth):
    root, _ = tiny_synth
    cfg = SynthConfig(**json.loads(pathlib.Path(root, "manifest.json").read_text())["config"])
    last = cfg.n_weeks - 1
    gen, cust, art = ceiling.generator_at(cfg, last)
    week = gen.week(last, int(synth.weekly_volume(cfg, gen.start)[last]))
    regenerated = sorted(zip(week["customer_id"].to_pylist(),
                             art["article_id"].take(week["article_idx"]).to_pylist()))
    tx = pq.read_table(f"{root}/transactions")
    first_day = pc.max(tx["t_dat"]).as_py() - dt.timedelta(days=6)
    actual = tx.filter(pc.greater_equal(tx["t_dat"], first_day))
    assert regenerated == sorted(zip(actual["customer_id"].to_pylist(), actual["article_id"].to_pylist()))


def test_ceiling_beats_popularity_and_ranks_valid_articles(tiny_synth, tiny_prepared):
    root, _ = tiny_synth
    prepared, _ = tiny_prepared
    ranked, offsets, items, n_idx = ceiling.ceiling_ranking(root, prepared)
    assert ranked.shape == (len(offsets) - 1, 12)
    assert ranked.min() >= 1 and ranked.max() < n_idx  # never the OOV row
    assert all(len(set(r)) == 12 for r in ranked.tolist())
    customers, _, _ = load_eval(prepared, "val")
    ex = pq.read_table(f"{prepared}/examples", columns=["customer_idx", "article_idx", "day"])
    inter = bl.Interactions(ex["customer_idx"].to_numpy(), ex["article_idx"].to_numpy(), ex["day"].to_numpy(),
                            int(max(customers.max(), ex["customer_idx"].to_numpy().max())) + 1, n_idx)
    pop = metrics(bl.popularity(inter, len(customers), 12), Jagged(offsets, items), ks=(12,))["map@12"]
    best = metrics(ranked, Jagged(offsets, items), ks=(12,))["map@12"]
    assert best > 1.5 * pop, (best, pop)
    assert np.isfinite(best)


def test_the_style_posterior_finds_the_hidden_styles(tiny_synth, tiny_prepared):
    """Against the generator's truth: the history moves the posterior onto each customer's true primary
    style (beyond what age alone gives) and finds the secondary style no attribute shows."""
    root, _ = tiny_synth
    prepared, _ = tiny_prepared
    cfg = SynthConfig(**json.loads(pathlib.Path(root, "manifest.json").read_text())["config"])
    val = pq.read_table(f"{prepared}/eval/val.parquet", columns=["customer_id", "day"])
    first = int(pc.min(val["day"]).as_py())
    week = (dt.date(1970, 1, 1) + dt.timedelta(days=first) - dt.date.fromisoformat(cfg.start_date)).days // 7
    gen, cust, art = ceiling.generator_at(cfg, week)
    rows = pc.index_in(val["customer_id"], cust["customer_id"]).to_numpy()
    post = ceiling.style_posterior(root, cfg, gen, cust["customer_id"], art["article_id"], rows, first)
    n = np.arange(len(rows))
    assert post.shape == (len(rows), gen.styles.n, gen.styles.n)
    assert np.allclose(post.sum(axis=(1, 2)), 1.0)
    primary = post.sum(axis=2)[n, gen.cust["primary"][rows]]
    secondary = post.sum(axis=1)[n, gen.cust["secondary"][rows]]
    # the prior alone: the generator's p(primary | age, news), by its own formula
    age = pq.read_table(f"{root}/customers.parquet")["age"].to_numpy(zero_copy_only=False).astype(float)
    age = age[pc.index_in(cust["customer_id"], pq.read_table(f"{root}/customers.parquet")["customer_id"])
              .to_numpy()[rows]]
    w = np.exp(-((age[:, None] - gen.styles.age_mu[None, :]) ** 2) / (2 * synth.AGE_SPREAD ** 2))
    w[np.isnan(age)] = 1.0
    age_only = (w / w.sum(axis=1, keepdims=True))[n, gen.cust["primary"][rows]]
    assert primary.mean() > 0.6 and primary.mean() > age_only.mean() + 0.1, (primary.mean(), age_only.mean())
    assert secondary.mean() > 5.0 / gen.styles.n, secondary.mean()  # uniform a priori: 1 / styles


def test_the_knowable_ceiling_lies_between_popularity_and_the_ceiling(tiny_synth, tiny_prepared):
    root, _ = tiny_synth
    prepared, _ = tiny_prepared
    truth, offsets, items, n_idx = ceiling.ceiling_ranking(root, prepared)
    known, _, _, _ = ceiling.ceiling_ranking(root, prepared, knowable=True)
    m_truth = metrics(truth, Jagged(offsets, items), ks=(12,))["map@12"]
    m_known = metrics(known, Jagged(offsets, items), ks=(12,))["map@12"]
    assert 0.5 * m_truth < m_known <= 1.02 * m_truth, (m_known, m_truth)


def test_purchase_kinds_against_a_loop_over_the_generator_state(tiny_synth, tiny_prepared):
    root, _ = tiny_synth
    prepared, _ = tiny_prepared
    kinds = ceiling.purchase_kinds(root, prepared)
    cfg = SynthConfig(**json.loads(pathlib.Path(root, "manifest.json").read_text())["config"])
    _, targets, _ = load_eval(prepared, "val")
    offsets, items = targets.offsets, targets.values
    val = pq.read_table(f"{prepared}/eval/val.parquet", columns=["customer_id", "day"])
    first = dt.date(1970, 1, 1) + dt.timedelta(days=int(pc.min(val["day"]).as_py()))
    gen, cust, art = ceiling.generator_at(cfg, (first - dt.date.fromisoformat(cfg.start_date)).days // 7)
    vocab = pq.read_table(f"{prepared}/vocab/article_id.parquet")
    article_id_of = dict(zip(vocab["index"].to_pylist(), vocab["value"].to_pylist()))
    art_row = {a: i for i, a in enumerate(art["article_id"].to_pylist())}
    cust_row = {c: i for i, c in enumerate(cust["customer_id"].to_pylist())}
    want = []
    for i, customer_id in enumerate(val["customer_id"].to_pylist()):
        c = cust_row[customer_id]
        ring = set(gen.ring[c, :gen.ring_len[c]].tolist())
        for item in items[offsets[i]:offsets[i + 1]].tolist():
            a = art_row[article_id_of[item]]
            s = gen.art["style"][a]
            want.append(0 if a in ring else 1 if s == gen.cust["primary"][c] else
                        2 if s == gen.cust["secondary"][c] else 3)
    assert kinds.tolist() == want
    assert set(want) == {0, 1, 2, 3}  # every kind occurs on the tiny data


def test_recall_by_kind_by_hand():
    # two customers: targets [5, 6] and [7]; kinds [0, 1] and [0]; top-2 lists [5, 9] and [8, 7]
    got = ceiling.recall_by_kind(np.array([[5, 9], [8, 7]]), np.array([0, 2, 3]), np.array([5, 6, 7]),
                                 np.array([0, 1, 0]))
    assert got[:2] == [1.0, 0.0] and np.isnan(got[2]) and np.isnan(got[3])
