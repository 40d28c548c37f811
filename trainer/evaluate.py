"""Evaluate the model against baselines on the held-out period: JSON + Markdown report.

    python -m trainer.evaluate data=small                          # validation week
    python -m trainer.evaluate data=small evaluate.exclude_seen=true
    python -m trainer.evaluate data=small '+evaluate.runs={MF: runs/small/export-mf}'

Full-catalogue retrieval: through the FAISS index of the index stage when it exists (at its chosen
nprobe), else exact inner-product search. Baselines (trainer/baselines.py) use the same training
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
import scipy.sparse as sp
from omegaconf import DictConfig

from data.io import atomic_open, fs_and_path, join, read_json, read_table, write_json
from data.runinfo import FILE_ONLY, start_run
from data.staging import output_of
from trainer import plots
from trainer import baselines as bl
from trainer import config as _train_config  # noqa: F401  (registers the evaluate schema)
from trainer import index as ix
from trainer.fingerprint import data_digest
from trainer.metrics import evaluate as metrics
from trainer.metrics import recall_curve
from trainer import search
from trainer.repeats import boost_recent
from trainer.search import top_k

log = logging.getLogger(__name__)


def _exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)


def load_eval(prepared: str, period: str):
    ev = pq.read_table(join(prepared, "eval", f"{period}.parquet"))
    t = ev["targets"].combine_chunks()
    offsets = t.offsets.to_numpy().astype(np.int64)
    items = t.values.to_numpy().astype(np.int64)[offsets[0]:offsets[-1]]
    hist = ev["history"].combine_chunks()
    h_off = hist.offsets.to_numpy()
    h_val = hist.values.to_numpy()
    history = [h_val[h_off[i]:h_off[i + 1]].astype(np.int64) for i in range(ev.num_rows)]
    return ev["customer_idx"].to_numpy(), offsets - offsets[0], items, history


def seen_matrix(inter: bl.Interactions, customers: np.ndarray) -> sp.csr_matrix:
    return inter.user_item[customers]


def drop_seen(ranked: np.ndarray, seen: sp.csr_matrix, k: int) -> np.ndarray:
    """First k items of each row not already bought (ranked must be longer than k)."""
    return search.drop_seen(ranked, seen.indptr, seen.indices, k)


def model_ranking(export_dir: str, customers: np.ndarray, index_dir: str | None, k: int,
                  period: str = "val", history: list | None = None) -> tuple[np.ndarray, str]:
    """Top-k article_idx per evaluation customer from exported embeddings: through the IVF index when
    there is one (it must have been built from this export), else exact search; on the GPU when present.
    With ``history`` (each customer's articles, oldest first) and a learned repeat bonus in the export,
    the customer's last articles carry it (trainer/repeats.py)."""
    exported = read_json(join(output_of(export_dir), "export_report.json"))
    item_idx, items = ix.read_embeddings(join(output_of(export_dir), "items.parquet"), "article_idx")
    user_idx, users = ix.read_embeddings(join(output_of(export_dir), f"users_{period}.parquet"), "customer_idx")
    pos = {c: i for i, c in enumerate(user_idx.tolist())}
    missing = [c for c in customers.tolist() if c not in pos]
    if missing:
        raise ValueError(f"{export_dir}/users_{period}.parquet lacks {len(missing)} evaluation customers; re-run export")
    at = [pos[c] for c in customers.tolist()]
    q = users[at]
    level = _repeat_level(join(output_of(export_dir), f"users_{period}.parquet"), at)
    bonus = np.asarray(exported.get("repeat_bonus") or [], np.float32) if history is not None else np.zeros(0)
    ranked, how = _search(exported, item_idx, items, q, index_dir, k + len(bonus))
    if not len(bonus):
        return ranked, how
    by_idx = np.zeros((int(item_idx.max()) + 1, items.shape[1]), np.float32)
    by_idx[item_idx] = items
    offsets = np.r_[0, np.cumsum([len(h) for h in history])].astype(np.int64)
    values = np.concatenate(history) if len(history) else np.zeros(0, np.int64)
    out = np.empty((len(customers), k), np.int64)
    for lo in range(0, len(customers), 8192):
        hi = min(lo + 8192, len(customers))
        out[lo:hi] = boost_recent(ranked[lo:hi], q[lo:hi], by_idx, offsets[lo:hi + 1] - offsets[lo],
                                  values[offsets[lo]:offsets[hi]], bonus, k,
                                  None if level is None else level[lo:hi], exported.get("temperature"))
    return out, how + f" + buying again ({len(bonus)} positions, {'mixture' if level is not None else 'bonus'})"


def _repeat_level(users_url: str, rows: list) -> np.ndarray | None:
    """The exported customers' buying-again level (trainer/repeats.py) at ``rows``, or None without."""
    fs, path = fs_and_path(users_url)
    if "repeat_level" not in pq.read_schema(path, filesystem=fs).names:
        return None
    return read_table(users_url, columns=["repeat_level"])["repeat_level"].to_numpy()[rows]


def _search(exported: dict, item_idx: np.ndarray, items: np.ndarray, q: np.ndarray, index_dir: str | None,
            k: int) -> tuple[np.ndarray, str]:
    """Top-k article_idx per query by inner product: the export's IVF index when there is one, else exact."""
    if index_dir and _exists(join(output_of(index_dir), "index.faiss")):
        ix.check_matches(index_dir, exported.get("fingerprint"), exported.get("step"))
        index, _ = ix.load(index_dir)
        searcher = ix.for_search(index, _read_nprobe(index_dir))
        rows = searcher.search(np.ascontiguousarray(q), k)[1]
        # index rows are the non-OOV articles in export order: map back to article_idx
        keep = item_idx[item_idx > 0]
        return np.where(rows >= 0, keep[np.clip(rows, 0, None)], -1), f"IVF (nprobe {_read_nprobe(index_dir)})"
    rows = top_k(q, items, k, exclude_items=np.flatnonzero(item_idx == 0)).cpu().numpy()
    return np.where(rows >= 0, item_idx[np.clip(rows, 0, None)], -1), "exact"


def exported_run(export_dir: str, prepared: str) -> dict:
    """Which train run, step and fingerprint an export holds; refuses one made from other prepared data."""
    report = read_json(join(output_of(export_dir), "export_report.json"))
    now = data_digest(read_json(join(prepared, "manifest.json")))
    if report.get("data_digest") != now:
        raise RuntimeError(f"{export_dir} holds embeddings of a model trained on other prepared data (digest "
                           f"{report.get('data_digest')}) than {prepared} (digest {now}); export again")
    log.info("evaluating run %s step %d (fingerprint %s) from %s", report["train_dir"], report["step"],
             report["fingerprint"], export_dir)
    return report


def _read_nprobe(index_dir: str) -> int:
    return read_json(join(output_of(index_dir), "index_report.json"))["nprobe"]


def sampled_protocol(export_dir: str, customers: np.ndarray, offsets, items, n_neg: int, seed: int,
                     n_items: int, period: str = "val") -> dict:
    """Each positive ranked against n_neg random articles: HitRate@10 and NDCG@10 (optimistic)."""
    item_idx, item_emb = ix.read_embeddings(join(output_of(export_dir), "items.parquet"), "article_idx")
    user_idx, users = ix.read_embeddings(join(output_of(export_dir), f"users_{period}.parquet"), "customer_idx")
    pos_of = {c: i for i, c in enumerate(user_idx.tolist())}
    rows = np.repeat(np.arange(len(customers)), np.diff(offsets))
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
    customers, offsets, items, history = load_eval(prepared, str(ec.period))
    manifest_n_items = int(pq.read_table(join(prepared, "item_freq.parquet")).num_rows)
    ex = pq.read_table(join(prepared, "examples"), columns=["customer_idx", "article_idx", "day"])
    inter = bl.Interactions(ex["customer_idx"].to_numpy(), ex["article_idx"].to_numpy(), ex["day"].to_numpy(),
                            int(max(customers.max(), ex["customer_idx"].to_numpy().max())) + 1, manifest_n_items,
                            window_days=ec.popularity_days)
    k_max = max(ec.ks)
    width = k_max + (ec.seen_margin if ec.exclude_seen else 0)
    seen = seen_matrix(inter, customers) if ec.exclude_seen else None
    rankings: dict[str, np.ndarray] = {}
    notes: dict[str, str] = {}
    timings: dict[str, float] = {}

    def add(name: str, fn):
        t0 = time.perf_counter()
        r = fn()
        timings[name] = round(time.perf_counter() - t0, 3)
        log.info("%s: top-%d for %d customers in %.1fs", name, width, len(customers), timings[name],
                 extra=FILE_ONLY)
        rankings[name] = drop_seen(r, seen, k_max) if seen is not None else r[:, :k_max]

    model_run = None
    if _exists(join(output_of(cfg.export_dir), "items.parquet")):
        model_run = exported_run(cfg.export_dir, prepared)

        def model():
            r, how = model_ranking(cfg.export_dir, customers, cfg.index_dir, width, str(ec.period),
                                   None if ec.exclude_seen else history)
            notes["two-tower"] = how
            return r
        add("two-tower", model)
    for name, export_dir in (ec.runs or {}).items():
        add(name, lambda d=export_dir: model_ranking(d, customers, None, width, str(ec.period),
                                                     None if ec.exclude_seen else history)[0])
    add("popularity (last week)", lambda: bl.popularity(inter, len(customers), width))
    add("repurchase + popularity", lambda: bl.repurchase(inter, history, width))
    add("co-visitation", lambda: bl.covisitation(inter, history, width))
    add("item-kNN", lambda: bl.item_knn(inter, history, width))
    art = pq.read_table(join(prepared, "features", "articles.parquet"), columns=["article_idx", "desc_tokens"]) \
        if "desc_tokens" in pq.read_schema(join(prepared, "features", "articles.parquet")).names else None
    if art is not None:
        order = np.argsort(art["article_idx"].to_numpy())
        tok = art["desc_tokens"].take(order).combine_chunks()
        lengths = np.zeros(manifest_n_items, np.int64)
        lengths[art["article_idx"].to_numpy()[order]] = np.diff(tok.offsets.to_numpy())
        t_off = np.r_[0, np.cumsum(lengths)]
        t_val = tok.values.to_numpy()[tok.offsets.to_numpy()[0]:tok.offsets.to_numpy()[-1]]
        add("TF-IDF content", lambda: bl.tfidf(inter, history, t_off, t_val, width))

    results = {name: metrics(r, offsets, items, ks=tuple(ec.ks), catalog_size=manifest_n_items - 1)
               for name, r in rankings.items()}
    report = {"period": ec.period, "customers": int(len(customers)), "exclude_seen": bool(ec.exclude_seen),
              "model_run": model_run,
              "full_catalogue": results, "retrieval": notes, "seconds": timings}
    if ec.sampled_negatives and "two-tower" in rankings:
        report["sampled_optimistic"] = sampled_protocol(cfg.export_dir, customers, offsets, items,
                                                        ec.sampled_negatives, ec.seed, manifest_n_items, str(ec.period))
    report["pictures"] = pictures(cfg, rankings, offsets, items, model_run)
    write_json(report, join(cfg.run_dir, "evaluation.json"))
    md = markdown(report, ec.ks)
    with atomic_open(join(cfg.run_dir, "evaluation.md"), "w") as f:
        f.write(md)
    return report


def pictures(cfg, rankings: dict, offsets: np.ndarray, items: np.ndarray, model_run: dict | None) -> dict:
    """PNGs beside the report: Recall@K of every method; and, when they exist, the index's nprobe curve
    and the model's training curves (drawn again from the index and train runs' own records)."""
    out = {}
    curves = {name: recall_curve(r, offsets, items) for name, r in rankings.items()}
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
