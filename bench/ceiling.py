"""The best MAP@12 any model can reach on a synthetic dataset: the generator's own purchase probabilities.

Re-runs data.synth's generator in memory (same config and seeds as the dataset's manifest) up to the
validation week, then ranks, for each validation customer, every article by its true probability of being
the next purchase: a repurchase of one of the customer's last 8 articles, else an article of the
customer's primary or hidden secondary style, else any article, each weighted by the article's true
popularity that week. No model sees the hidden secondary style or the generator's ring of last purchases;
this is an upper reference, printed beside the evaluation report of a run.

The second row, "knowable", is what the same ranking reaches when the customer's two styles are not
given but inferred as a model would have to: their posterior given the customer's age and news
frequency (the generator's prior) and the styles of the articles in each of their training visits
(a visit is about the primary or the secondary style; a purchase is of that style with probability
``style_affinity``). The ring of the last 8 purchases is the customer's visible history and the
popularity the generator's own, as above: a model with perfect weekly sales and perfect style inference
would reach it.

With ``--export`` (a run's export directory), Recall@12 is also broken down by what the generator did
for each validation purchase: a repurchase of one of the customer's last 8 articles, an article of
their primary or their hidden secondary style, or one from anywhere; for the ceiling, the knowable
ranking and that run's two-tower ranking (exact search, with its repeat bonus).

    .venv/bin/python bench/ceiling.py --data small [--report runs/small/evaluate/evaluation.json]
                                                   [--export runs/small/export]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pathlib
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.special import logsumexp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import synth  # noqa: E402
from data.config import SynthConfig  # noqa: E402
from data.jagged import Jagged  # noqa: E402
from trainer.evaluate import load_eval, model_ranking  # noqa: E402
from trainer.evaluation.metrics import evaluate as metrics  # noqa: E402


def generator_at(cfg: SynthConfig, week: int) -> tuple[synth.Generator, dict, dict]:
    """The generator's state just before ``week`` (weeks before it generated and discarded)."""
    seeds = np.random.SeedSequence(cfg.seed).spawn(3)
    styles = synth.Styles(np.random.default_rng(seeds[0]), cfg.n_styles)
    customers, cust = synth.make_customers(cfg, np.random.default_rng(seeds[1]), styles)
    articles, art = synth.make_articles(cfg, np.random.default_rng(seeds[2]), styles)
    gen = synth.Generator(cfg, cust, art, styles, customers["customer_id"].combine_chunks())
    volume = synth.weekly_volume(cfg, gen.start)
    for w in range(week):
        gen.week(w, int(volume[w]))
    return gen, {"customer_id": customers["customer_id"]}, {"article_id": articles["article_id"]}


def style_posterior(data_root: str, cfg: SynthConfig, gen: synth.Generator, cust_ids: pa.Array, art_ids: pa.Array,
                    rows: np.ndarray, before_day: int) -> np.ndarray:
    """(customers, styles, styles) P(primary, secondary | age, news frequency, training visits) of the
    generator rows ``rows``, from the transactions before ``before_day`` (days since 1970-01-01). A
    visit (customer, day) has one style, the primary with probability 1 - secondary_style_share; each of
    its articles is of that style with probability style_affinity, else of any style by its share of
    sales (repurchases are counted as new purchases: an approximation)."""
    customers = pq.read_table(f"{data_root}/customers.parquet", columns=["customer_id", "age",
                                                                          "fashion_news_frequency"])
    at = pc.index_in(cust_ids, customers["customer_id"]).to_numpy()[rows]
    age = customers["age"].to_numpy(zero_copy_only=False).astype(np.float64)[at]
    regular = pc.fill_null(pc.equal(customers["fashion_news_frequency"], "Regularly"), False)
    regular = regular.to_numpy(zero_copy_only=False).astype(bool)[at]
    styles = gen.styles
    prior = styles.primary_weights(age, regular)  # what the generator drew the primary style from
    log_prior = np.log(prior / prior.sum(axis=1, keepdims=True))

    tx = pq.read_table(f"{data_root}/transactions", columns=["t_dat", "customer_id", "article_id"])
    day = tx["t_dat"].cast(pa.int32()).to_numpy()
    style = gen.art["style"][pc.index_in(tx["article_id"], art_ids).to_numpy()]
    train = day < before_day
    share = np.bincount(style[train], minlength=styles.n) / train.sum()
    pos_of = np.full(len(cust_ids), -1)
    pos_of[rows] = np.arange(len(rows))
    who = pos_of[pc.index_in(tx["customer_id"], cust_ids).to_numpy()]
    keep = train & (who >= 0)
    who, day, style = who[keep], day[keep], style[keep]
    # log-likelihood of each visit's articles if the visit is about style s, up to a per-visit constant
    aff, sec = cfg.style_affinity, cfg.secondary_style_share
    gain = np.log1p(aff / (share.clip(1e-12) * (1 - aff)))
    visits, visit_of = np.unique(who.astype(np.int64) * 100_000 + day, return_inverse=True)
    per_style = np.zeros((len(visits), styles.n))
    np.add.at(per_style, (visit_of, style), 1.0)
    log_l = per_style * gain[None, :]
    owner = visits // 100_000
    bounds = np.searchsorted(owner, np.arange(len(rows) + 1))  # visits are sorted by customer
    post = np.empty((len(rows), styles.n, styles.n))
    for i in range(len(rows)):  # per customer: (visits, S, S), a few hundred KB
        ll = log_l[bounds[i]:bounds[i + 1]]
        both = np.logaddexp(np.log(1 - sec) + ll[:, :, None], np.log(sec) + ll[:, None, :]).sum(axis=0)
        lp = log_prior[i][:, None] + both  # the secondary style: uniform
        post[i] = np.exp(lp - logsumexp(lp))
    return post


@dataclass
class ValidationWeek:
    """The validation week of a synthetic dataset and the generator's state just before it."""

    cfg: SynthConfig
    offsets: np.ndarray  # the evaluation targets (CSR over customers, prepared article_idx)
    items: np.ndarray
    val: pa.Table  # customer_id, day of each evaluation customer
    first_day: dt.date
    week: int
    gen: synth.Generator
    cust_ids: dict
    art_ids: dict
    vocab: pa.Table  # the prepared article vocabulary (index, value)

    @property
    def rows(self) -> np.ndarray:
        """The generator's row of each evaluation customer (every one was generated)."""
        return pc.index_in(self.val["customer_id"], self.cust_ids["customer_id"]).to_numpy()


def validation_week(data_root: str, prepared: str | None = None) -> ValidationWeek:
    cfg = SynthConfig(**json.loads(pathlib.Path(data_root, "manifest.json").read_text())["config"])
    prepared = prepared or f"{data_root}/prepared"
    _, targets, _ = load_eval(prepared, "val")
    offsets, items = targets.offsets, targets.values
    val = pq.read_table(f"{prepared}/eval/val.parquet", columns=["customer_id", "day"])
    first_day = dt.date(1970, 1, 1) + dt.timedelta(days=int(pc.min(val["day"]).as_py()))
    week = (first_day - dt.date.fromisoformat(cfg.start_date)).days // 7
    gen, cust_ids, art_ids = generator_at(cfg, week)
    return ValidationWeek(cfg, offsets, items, val, first_day, week, gen, cust_ids, art_ids,
                          pq.read_table(f"{prepared}/vocab/article_id.parquet"))


def ceiling_ranking(data_root: str, prepared: str | None = None, k: int = 12, chunk: int = 1024,
                    knowable: bool = False, state: ValidationWeek | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Top-k article_idx per validation customer by the generator's probabilities; with ``knowable``,
    the customer's styles are their posterior (:func:`style_posterior`) instead of the truth."""
    state = state or validation_week(data_root, prepared)
    cfg, offsets, items, gen, week = state.cfg, state.offsets, state.items, state.gen, state.week
    first_val_day, cust_ids, art_ids, vocab = state.first_day, state.cust_ids, state.art_ids, state.vocab
    n_idx = int(pc.max(vocab["index"]).as_py()) + 1
    # generator article row -> prepared article_idx (0: not in the vocabulary)
    hit = pc.fill_null(pc.index_in(art_ids["article_id"], vocab["value"]), -1).to_numpy()
    known = np.flatnonzero(hit >= 0)
    to_idx = vocab["index"].to_numpy()[hit[known]]

    woy = (gen.start + dt.timedelta(weeks=week)).timetuple().tm_yday / 7.0
    w = synth.week_weights(gen.art, week, woy)
    style = gen.art["style"]
    per_style = np.zeros((gen.styles.n, len(w)))
    per_style[style, np.arange(len(w))] = w
    per_style /= per_style.sum(axis=1, keepdims=True).clip(1e-300)
    anywhere = w / w.sum()

    rows = state.rows
    aff, share, rep = cfg.style_affinity, cfg.secondary_style_share, cfg.repurchase_rate
    if knowable:  # P(a visit is about style s)
        post = style_posterior(data_root, cfg, gen, cust_ids["customer_id"], art_ids["article_id"], rows,
                               (first_val_day - dt.date(1970, 1, 1)).days)
        visit_style = (1 - share) * post.sum(axis=2) + share * post.sum(axis=1)
    else:
        visit_style = np.zeros((len(rows), gen.styles.n))
        np.add.at(visit_style, (np.arange(len(rows)), gen.cust["primary"][rows]), 1 - share)
        np.add.at(visit_style, (np.arange(len(rows)), gen.cust["secondary"][rows]), share)
    out = []
    for lo in range(0, len(rows), chunk):
        c = rows[lo:lo + chunk]
        have = gen.ring_len[c]
        p_rep = np.where(have > 0, rep, 0.0)[:, None]
        p = (1 - p_rep) * (aff * visit_style[lo:lo + chunk] @ per_style + (1 - aff) * anywhere)
        for j in range(synth.RING):  # each remembered article: rep / have
            live = j < have
            np.add.at(p, (np.flatnonzero(live), gen.ring[c[live], j]), rep / have[live])
        # to prepared ids: articles outside the vocabulary can't be scored by any method
        scores = np.full((len(c), n_idx), -1.0)
        scores[:, to_idx] = p[:, known]
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        out.append(np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), 1), 1))
    return np.concatenate(out), offsets, items, n_idx


KINDS = ("repurchase", "primary style", "secondary style", "anywhere")


def purchase_kinds(data_root: str, prepared: str | None = None, state: ValidationWeek | None = None) -> np.ndarray:
    """For each validation purchase (in the order of the evaluation targets), the index in KINDS of
    what the generator most likely did: an article in the customer's ring of last purchases is a
    repurchase, else the article's style says primary, secondary or neither."""
    state = state or validation_week(data_root, prepared)
    gen, offsets, vocab = state.gen, state.offsets, state.vocab
    row_of_idx = np.full(int(pc.max(vocab["index"]).as_py()) + 1, -1)
    row_of_idx[vocab["index"].to_numpy()] = pc.index_in(vocab["value"], state.art_ids["article_id"]).to_numpy()
    customer = state.rows[np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))]
    article = row_of_idx[state.items]
    live = np.arange(synth.RING)[None, :] < gen.ring_len[customer][:, None]
    in_ring = ((gen.ring[customer] == article[:, None]) & live).any(axis=1)
    style = gen.art["style"][article]
    return np.select([in_ring, style == gen.cust["primary"][customer], style == gen.cust["secondary"][customer]],
                     [0, 1, 2], 3)


def recall_by_kind(ranked: np.ndarray, offsets: np.ndarray, items: np.ndarray, kinds: np.ndarray) -> list[float]:
    """The share of each kind's purchases that the customer's top-k holds."""
    owner = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    hit = (ranked[owner] == items[:, None]).any(axis=1)
    return [float(hit[kinds == k].mean()) if (kinds == k).any() else float("nan") for k in range(len(KINDS))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="small")
    ap.add_argument("--report", help="an evaluation.json to print beside the ceiling")
    ap.add_argument("--export", help="a run's export directory: Recall@12 by kind of purchase, beside the references")
    args = ap.parse_args()
    root = str(ROOT / "datasets" / args.data)
    state = validation_week(root)  # the generator replayed once for every ranking below
    ranked, offsets, items, n_idx = ceiling_ranking(root, state=state)
    m = metrics(ranked, Jagged(offsets, items), ks=(12,), catalog_size=n_idx - 1)
    rankings = {"ceiling": ranked}
    rankings["knowable"], _, _, _ = ceiling_ranking(root, knowable=True, state=state)
    known = metrics(rankings["knowable"], Jagged(offsets, items), ks=(12,), catalog_size=n_idx - 1)
    print(f"data={args.data}, validation week, {len(offsets) - 1:,} customers")
    print(f"{'method':<28} {'map@12':>8} {'recall@12':>10} {'of ceiling':>11}")
    print(f"{'ceiling (generator truth)':<28} {m['map@12']:>8.4f} {m['recall@12']:>10.4f} {1.0:>10.2f}x")
    print(f"{'knowable (styles inferred)':<28} {known['map@12']:>8.4f} {known['recall@12']:>10.4f} "
          f"{known['map@12'] / m['map@12']:>10.2f}x")
    if args.report:
        for name, r in json.loads(pathlib.Path(args.report).read_text())["full_catalogue"].items():
            print(f"{name:<28} {r['map@12']:>8.4f} {r['recall@12']:>10.4f} {r['map@12'] / m['map@12']:>10.2f}x")
    if args.export:
        customers, _, history = load_eval(f"{root}/prepared", "val")
        rankings["two-tower"], _ = model_ranking(args.export, customers, None, 12, history=history)
        kinds = purchase_kinds(root, state=state)
        print(f"\nRecall@12 by kind of purchase ({', '.join(f'{KINDS[k]} {np.mean(kinds == k):.0%}' for k in range(4))})")
        print(f"{'ranking':<12}" + "".join(f"{k:>18}" for k in KINDS))
        for name, r in rankings.items():
            print(f"{name:<12}" + "".join(f"{x:>18.3f}" for x in recall_by_kind(r, offsets, items, kinds)))


if __name__ == "__main__":
    main()
