"""Evaluate the model against baselines on the held-out period: JSON + Markdown report.

    python -m trainer.evaluate data=small                          # validation week
    python -m trainer.evaluate data=small evaluate.exclude_seen=true
    python -m trainer.evaluate data=small '+evaluate.runs={MF: runs/small/export-mf}'

Full-catalogue retrieval: through the FAISS index of the index stage when it exists (at its chosen
nprobe), else exact inner-product search. Baselines (trainer/evaluation/baselines.py) use the same training
interactions and the same evaluation customers. The sampled protocol (each customer's positives
ranked among 100 random negatives) is reported separately and labelled optimistic: it is not
comparable with full-catalogue numbers.
"""

from __future__ import annotations

import logging
import time

import hydra
import numpy as np
import pyarrow.parquet as pq
from omegaconf import DictConfig

from data.io import atomic_open, fs_and_path, join, read_json, read_table, write_json
from data.jagged import Jagged
from data.prepared import Prepared
from data.runinfo import FILE_ONLY, start_run
from data.staging import output_of
from trainer import config as _train_config  # noqa: F401  (registers the evaluate schema)
from trainer.evaluation import baselines as bl
from trainer.evaluation import freshness as fresh
from trainer.evaluation import plots
from trainer.evaluation.metrics import evaluate as metrics
from trainer.evaluation.metrics import recall_curve
from trainer.evaluation.purchases import training_purchases
from trainer.loop.fingerprint import data_digest
from trainer.retrieval import ivf as ix
from trainer.retrieval.ranker import Queries
from trainer.retrieval.retriever import Retriever
from trainer.retrieval.search import drop_seen, list_column

log = logging.getLogger(__name__)


def _exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)


def load_eval(prepared: str, period: str) -> tuple[np.ndarray, Jagged, Jagged]:
    """(customer_idx, targets, history oldest first) of an evaluation period."""
    ev = pq.read_table(join(prepared, "eval", f"{period}.parquet"))
    return ev["customer_idx"].to_numpy(), list_column(ev, "targets"), list_column(ev, "history")


def query_days(prepared: str, period: str) -> np.ndarray:
    return pq.read_table(join(prepared, "eval", f"{period}.parquet"), columns=["day"])["day"].to_numpy()


def model_ranking(export_dir: str, customers: np.ndarray, index_dir: str | None, k: int, period: str = "val",
                  seen: Jagged | None = None, history: Jagged | None = None) -> tuple[np.ndarray, str]:
    """Top-k article_idx per evaluation customer from an export, through the Retriever (trainer/retrieval/retriever.py):
    the index stage's IVF index when there is one (it must have been built from this export), else exact
    search. ``seen``: each customer's articles left out; ``history`` (oldest first): read by the
    buying-again term when nothing is left out."""
    retriever = Retriever.from_export(export_dir, index_dir)
    users_url = join(output_of(export_dir), f"users_{period}.parquet")
    user_idx, users = ix.read_embeddings(users_url, "customer_idx")
    pos = {c: i for i, c in enumerate(user_idx.tolist())}
    missing = [c for c in customers.tolist() if c not in pos]
    if missing:
        raise ValueError(f"{export_dir}/users_{period}.parquet lacks {len(missing)} evaluation customers; re-run export")
    at = np.array([pos[c] for c in customers.tolist()], np.int64)
    levels = _repeat_level(users_url, at) if retriever.buys_again(seen) else None
    out = np.empty((len(customers), k), np.int64)
    for lo in range(0, len(customers), 8192):
        rows = np.arange(lo, min(lo + 8192, len(customers)))
        out[rows] = retriever.rank(Queries(users[at[rows]], None if levels is None else levels[rows]), k,
                                   seen=seen.take(rows) if seen is not None else None,
                                   recent=history.take(rows) if history is not None else None)
    return out, retriever.how


def _repeat_level(users_url: str, rows: np.ndarray) -> np.ndarray | None:
    """The exported customers' buying-again level (trainer/model/repeats.py) at ``rows``, or None without."""
    fs, path = fs_and_path(users_url)
    if "repeat_level" not in pq.read_schema(path, filesystem=fs).names:
        return None
    return read_table(users_url, columns=["repeat_level"])["repeat_level"].to_numpy()[rows]


def exported_run(export_dir: str, prepared: str) -> dict:
    """Which train run, step and fingerprint an export holds; refuses one made from other prepared data."""
    report = read_json(join(output_of(export_dir), "export_report.json"))
    now = data_digest(Prepared.read(prepared))
    if report.get("data_digest") != now:
        raise RuntimeError(f"{export_dir} holds embeddings of a model trained on other prepared data (digest "
                           f"{report.get('data_digest')}) than {prepared} (digest {now}); export again")
    log.info("evaluating run %s step %d (fingerprint %s) from %s", report["train_dir"], report["step"],
             report["fingerprint"], export_dir)
    return report


def sampled_protocol(export_dir: str, customers: np.ndarray, targets: Jagged, n_neg: int, seed: int,
                     n_items: int, period: str = "val") -> dict:
    """Each positive ranked against n_neg random articles: HitRate@10 and NDCG@10 (optimistic)."""
    item_idx, item_emb = ix.read_embeddings(join(output_of(export_dir), "items.parquet"), "article_idx")
    user_idx, users = ix.read_embeddings(join(output_of(export_dir), f"users_{period}.parquet"), "customer_idx")
    pos_of = {c: i for i, c in enumerate(user_idx.tolist())}
    rows, items = targets.owners(), targets.values
    u = users[[pos_of[c] for c in customers[rows].tolist()]]
    rng = np.random.default_rng(seed)
    negs = rng.integers(1, n_items, size=(len(items), n_neg))
    pos_score = (u * item_emb[items]).sum(1)
    neg_score = np.einsum("nd,nkd->nk", u, item_emb[negs])
    rank = (neg_score > pos_score[:, None]).sum(1)  # 0-based rank of the positive
    return {"hitrate@10": float(np.mean(rank < 10)),
            "ndcg@10": float(np.mean(np.where(rank < 10, 1.0 / np.log2(rank + 2), 0.0))),
            "negatives": n_neg, "pairs": int(len(items))}


def run(cfg) -> dict:
    ec = cfg.evaluate
    prepared = cfg.prepare.out
    customers, targets, history = load_eval(prepared, str(ec.period))
    manifest_n_items = int(pq.read_table(join(prepared, "item_freq.parquet")).num_rows)
    ex = pq.read_table(join(prepared, "examples"), columns=["customer_idx", "article_idx", "day"])
    inter = bl.Interactions(ex["customer_idx"].to_numpy(), ex["article_idx"].to_numpy(), ex["day"].to_numpy(),
                            int(max(customers.max(), ex["customer_idx"].to_numpy().max())) + 1, manifest_n_items,
                            window_days=ec.popularity_days)
    k_max = max(ec.ks)
    width = k_max + (ec.seen_margin if ec.exclude_seen else 0)
    seen = training_purchases(prepared, customers) if ec.exclude_seen else None
    rankings: dict[str, np.ndarray] = {}
    notes: dict[str, str] = {}
    timings: dict[str, float] = {}

    def add(name: str, fn, retrieved: bool = False):
        """``retrieved``: a model's ranking from the Retriever, bought articles already left out; else a
        baseline's, fetched ``width`` deep and filtered here."""
        t0 = time.perf_counter()
        r = fn()
        timings[name] = round(time.perf_counter() - t0, 3)
        log.info("%s: top-%d for %d customers in %.1fs", name, k_max if retrieved else width, len(customers),
                 timings[name], extra=FILE_ONLY)
        rankings[name] = r if retrieved else drop_seen(r, seen, k_max) if seen is not None else r[:, :k_max]

    def model(export_dir: str, index_dir: str | None, note: str | None = None):
        r, how = model_ranking(export_dir, customers, index_dir, k_max, str(ec.period), seen, history)
        if note:
            notes[note] = how
        return r

    model_run = None
    if _exists(join(output_of(cfg.export_dir), "items.parquet")):
        model_run = exported_run(cfg.export_dir, prepared)
        add("two-tower", lambda: model(cfg.export_dir, cfg.index_dir, "two-tower"), retrieved=True)
    for name, export_dir in (ec.runs or {}).items():
        add(name, lambda d=export_dir: model(d, None), retrieved=True)
    add("popularity (last week)", lambda: bl.popularity(inter, len(customers), width))
    add("repurchase + popularity", lambda: bl.repurchase(inter, history, width))
    add("co-visitation", lambda: bl.covisitation(inter, history, width))
    add("item-kNN", lambda: bl.item_knn(inter, history, width))
    days, new_days = query_days(prepared, str(ec.period)), int(ec.new_article_days)
    first = fresh.first_sold(prepared, manifest_n_items)
    new_list = fresh.new_best_sellers(ex["article_idx"].to_numpy(), ex["day"].to_numpy(), first, int(days.min()),
                                      new_days, width)
    add("new-article best-sellers", lambda: bl.listed_first(new_list, inter, len(customers), width))
    art = pq.read_table(join(prepared, "features", "articles.parquet"), columns=["article_idx", "desc_tokens"]) \
        if "desc_tokens" in pq.read_schema(join(prepared, "features", "articles.parquet")).names else None
    if art is not None:
        order = np.argsort(art["article_idx"].to_numpy())
        tok = Jagged.from_arrow(art["desc_tokens"].take(order))
        lengths = np.zeros(manifest_n_items, np.int64)  # a row per article_idx, articles without tokens empty
        lengths[art["article_idx"].to_numpy()[order]] = tok.lengths()
        tokens = Jagged.from_lengths(lengths, tok.values)
        add("TF-IDF content", lambda: bl.tfidf(inter, history, tokens, width))

    results = {name: metrics(r, targets, ks=tuple(ec.ks), catalog_size=manifest_n_items - 1)
               for name, r in rankings.items()}
    kinds = fresh.pair_kinds(first, targets, days, new_days)
    k_kind = min(ec.ks)
    report = {"period": ec.period, "customers": int(len(customers)), "exclude_seen": bool(ec.exclude_seen),
              "model_run": model_run,
              "full_catalogue": results, "retrieval": notes, "seconds": timings,
              "by_article_kind": {name: fresh.recall_by_kind(r, targets, kinds, k_kind, new_days)
                                 for name, r in rankings.items()}}
    if ec.sampled_negatives and "two-tower" in rankings:
        report["sampled_optimistic"] = sampled_protocol(cfg.export_dir, customers, targets,
                                                        ec.sampled_negatives, ec.seed, manifest_n_items, str(ec.period))
    if "two-tower" in rankings and cfg.index_dir and ix.exists(cfg.index_dir):  # the index the model was ranked by
        r = read_json(join(output_of(cfg.index_dir), "index_report.json"))
        report["index"] = {"dir": str(cfg.index_dir), "digest": r.get("digest") or ix.file_digest(
            join(output_of(cfg.index_dir), "index.faiss")), "kind": r.get("kind"), "nprobe": r.get("nprobe")}
    report["pictures"] = pictures(cfg, rankings, targets, model_run)
    write_json(report, join(cfg.run_dir, "evaluation.json"))
    md = markdown(report, ec.ks)
    with atomic_open(join(cfg.run_dir, "evaluation.md"), "w") as f:
        f.write(md)
    return report


def pictures(cfg, rankings: dict, targets: Jagged, model_run: dict | None) -> dict:
    """PNGs beside the report: Recall@K of every method; and, when they exist, the index's nprobe curve
    and the model's training curves (drawn again from the index and train runs' own records)."""
    out = {}
    curves = {name: recall_curve(r, targets) for name, r in rankings.items()}
    plots.recall_curves(curves, join(cfg.run_dir, "recall_at_k.png"),
                        f"Recall@K on the {cfg.evaluate.period} period, full catalogue")
    out["recall_at_k.png"] = "Recall@K, model and baselines"
    index_report = join(output_of(cfg.index_dir), "index_report.json") if cfg.index_dir else None
    if index_report and _exists(index_report) and "two-tower" in rankings:
        r = read_json(index_report)
        k = int(next(key for key in r["sweep"][0] if key.startswith("recall@")).split("@")[1])
        plots.nprobe_curve(r["sweep"], k, r["exact_qps"], join(cfg.run_dir, "nprobe.png"), chosen=r["nprobe"])
        out["nprobe.png"] = "IVF index: recall against exact search and QPS per nprobe"
    history = join(model_run["train_dir"], "metrics.json") if model_run else None
    if history and _exists(history):
        h = read_json(history)
        metric = (h.get("best") or {}).get("metric") or next(
            (k for k in (h.get("val") or [{}])[0] if k.startswith("recall@")), "recall@12")
        plots.training_curves(h, join(cfg.run_dir, "training.png"), metric)
        out["training.png"] = f"training loss per step and validation {metric} per epoch"
    return out


def markdown(report: dict, ks) -> str:
    cols = ["map@12"] + [f"{m}@{k}" for k in ks for m in ("recall", "ndcg", "hitrate")] + ["mrr", "coverage"]
    lines = [f"Evaluation on the {report['period']} period: {report['customers']:,} customers, full-catalogue "
             f"retrieval{' excluding already-bought articles' if report['exclude_seen'] else ''}.", "",
             "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in report["full_catalogue"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(c, float('nan')):.4f}" for c in cols) + " |")
    by_kind = report.get("by_article_kind")
    if by_kind:
        first = next(iter(by_kind.values()))
        names = list(first)
        metric = next(k for k in first[names[0]] if k.startswith("recall@"))
        shares = ", ".join(f"{n} {first[n]['share']:.1%} ({first[n]['pairs']:,})" for n in names)
        lines += ["", f"{metric.capitalize()} by kind of article bought (share of the period's purchase pairs: "
                      f"{shares}):", "", "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for name, m in by_kind.items():
            lines.append(f"| {name} | " + " | ".join(f"{m[n][metric]:.4f}" for n in names) + " |")
    if "sampled_optimistic" in report:
        s = report["sampled_optimistic"]
        lines += ["", f"Sampled protocol (OPTIMISTIC, not comparable): each positive among {s['negatives']} random "
                      f"negatives: HitRate@10 {s['hitrate@10']:.4f}, NDCG@10 {s['ndcg@10']:.4f}."]
    for name, caption in report.get("pictures", {}).items():
        lines += ["", f"**{caption}**", "", f"![{caption}]({name})"]
    return "\n".join(lines) + "\n"


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    start_run(cfg)
    report = run(cfg)
    shown = {k: v for k, v in report.items() if k != "pictures"}
    print(markdown(shown, cfg.evaluate.ks) + f"Report and pictures ({', '.join(report['pictures'])}): "
          f"{join(cfg.run_dir, 'evaluation.md')}")
    return report


if __name__ == "__main__":
    main()
