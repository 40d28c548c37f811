"""The best MAP@12 any model can reach on a synthetic dataset: the generator's own purchase probabilities.

Re-runs data.synth's generator in memory (same config and seeds as the dataset's manifest) up to the
validation week, then ranks, for each validation customer, every article by its true probability of being
the next purchase: a repurchase of one of the customer's last 8 articles, else an article of the
customer's primary or hidden secondary style, else any article, each weighted by the article's true
popularity that week. No model sees the hidden secondary style or the generator's ring of last purchases;
this is an upper reference, printed beside the evaluation report of a run.

    .venv/bin/python bench/ceiling.py --data small [--report runs/small/evaluate/evaluation.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pathlib
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import synth  # noqa: E402
from data.config import SynthConfig  # noqa: E402
from trainer.evaluate import load_eval  # noqa: E402
from trainer.metrics import evaluate as metrics  # noqa: E402


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


def ceiling_ranking(data_root: str, prepared: str | None = None, k: int = 12,
                    chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    manifest = json.loads(pathlib.Path(data_root, "manifest.json").read_text())
    cfg = SynthConfig(**manifest["config"])
    prepared = prepared or f"{data_root}/prepared"
    customers, offsets, items, _ = load_eval(prepared, "val")
    val = pq.read_table(f"{prepared}/eval/val.parquet", columns=["customer_id", "day"])
    first_val_day = dt.date(1970, 1, 1) + dt.timedelta(days=int(pc.min(val["day"]).as_py()))
    week = (first_val_day - dt.date.fromisoformat(cfg.start_date)).days // 7
    gen, cust_ids, art_ids = generator_at(cfg, week)

    vocab = pq.read_table(f"{prepared}/vocab/article_id.parquet")
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

    rows = pc.index_in(val["customer_id"], cust_ids["customer_id"]).to_numpy()  # every one was generated
    aff, share, rep = cfg.style_affinity, cfg.secondary_style_share, cfg.repurchase_rate
    out = []
    for lo in range(0, len(rows), chunk):
        c = rows[lo:lo + chunk]
        have = gen.ring_len[c]
        p_rep = np.where(have > 0, rep, 0.0)[:, None]
        p = (1 - p_rep) * (aff * ((1 - share) * per_style[gen.cust["primary"][c]]
                                  + share * per_style[gen.cust["secondary"][c]]) + (1 - aff) * anywhere)
        for j in range(synth.RING):  # each remembered article: rep / have
            live = j < have
            np.add.at(p, (np.flatnonzero(live), gen.ring[c[live], j]), rep / have[live])
        # to prepared ids: articles outside the vocabulary can't be scored by any method
        scores = np.full((len(c), n_idx), -1.0)
        scores[:, to_idx] = p[:, known]
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        out.append(np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), 1), 1))
    return np.concatenate(out), offsets, items, n_idx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="small")
    ap.add_argument("--report", help="an evaluation.json to print beside the ceiling")
    args = ap.parse_args()
    ranked, offsets, items, n_idx = ceiling_ranking(str(ROOT / "datasets" / args.data))
    m = metrics(ranked, offsets, items, ks=(12,), catalog_size=n_idx - 1)
    print(f"data={args.data}, validation week, {len(offsets) - 1:,} customers")
    print(f"{'method':<28} {'map@12':>8} {'recall@12':>10} {'of ceiling':>11}")
    print(f"{'ceiling (generator truth)':<28} {m['map@12']:>8.4f} {m['recall@12']:>10.4f} {1.0:>10.2f}x")
    if args.report:
        for name, r in json.loads(pathlib.Path(args.report).read_text())["full_catalogue"].items():
            print(f"{name:<28} {r['map@12']:>8.4f} {r['recall@12']:>10.4f} {r['map@12'] / m['map@12']:>10.2f}x")


if __name__ == "__main__":
    main()
