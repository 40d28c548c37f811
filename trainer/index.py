"""The index stage: a FAISS IVF index over the export's item embeddings (trainer/retrieval/ivf.py),
nprobe swept against exact search with the validation customers as queries.

    python -m trainer.index data=small [index.kind=ivf_pq index.target_recall=0.98]
"""

from __future__ import annotations

import logging
import time

import hydra

from data.io import fs_and_path, join, read_json, read_table
from data.runinfo import FILE_ONLY, start_run
from data.staging import output_of
from trainer import config as _train_config  # noqa: F401  (registers the index schema)
from trainer.evaluation import plots
from trainer.retrieval.ivf import (
    build,
    choose_nprobe,
    exact_top_k,
    gpu_available,
    read_embeddings,
    save,
    sweep,
)

log = logging.getLogger(__name__)


def main_job(cfg) -> dict:
    """Builds the index from the export stage's item embeddings; sweeps nprobe with the validation
    customers' embeddings as queries; keeps the smallest nprobe that meets index.target_recall."""
    ic = cfg.index
    article_idx, items = read_embeddings(join(output_of(cfg.export_dir), "items.parquet"), "article_idx")
    art_ids = read_table(join(output_of(cfg.export_dir), "items.parquet"))["article_id"].to_numpy()
    keep = article_idx > 0  # the OOV row is not an article
    items, art_ids = items[keep], art_ids[keep]
    _, queries = read_embeddings(join(output_of(cfg.export_dir), "users_val.parquet"), "customer_idx")
    queries = queries[: ic.sweep_queries]
    t0 = time.perf_counter()
    on_gpu = gpu_available() if ic.gpu is None else bool(ic.gpu)
    index = build(items, kind=str(ic.kind), nlist=ic.nlist or None, pq_m=ic.pq_m, use_gpu=on_gpu, seed=ic.seed)
    build_s = time.perf_counter() - t0
    exact = exact_top_k(items, queries, ic.k)
    t0 = time.perf_counter()
    exact_top_k(items, queries, ic.k)
    exact_qps = len(queries) / (time.perf_counter() - t0)
    rows = sweep(index, items, queries, ic.k, exact=exact, use_gpu=on_gpu)
    nprobe = choose_nprobe(rows, ic.target_recall, ic.k)
    index.nprobe = nprobe
    export_report = join(output_of(cfg.export_dir), "export_report.json")
    report = {"kind": ic.kind, "nlist": index.nlist, "items": int(len(items)), "build_s": round(build_s, 3),
              "built_on": "GPU" if on_gpu else "CPU", "searched_on": "GPU" if on_gpu else "CPU", "nprobe": nprobe,
              "target_recall": ic.target_recall, "exact_qps": exact_qps, "sweep": rows,
              "export": read_json(export_report) if fs_and_path(export_report)[0].exists(
                  fs_and_path(export_report)[1]) else {}}
    save(index, art_ids, cfg.run_dir, report)
    plots.nprobe_curve(rows, ic.k, exact_qps, join(cfg.run_dir, "nprobe.png"), chosen=nprobe)
    return report


@hydra.main(config_path="../conf", config_name="index", version_base="1.3")
def main(cfg) -> dict:
    start_run(cfg)
    report = main_job(cfg)
    k = cfg.index.k
    run = report["export"]
    log.info("indexing the export of run %s step %s (fingerprint %s)", run.get("train_dir"), run.get("step"),
             run.get("fingerprint"))
    log.info("index %s nlist=%d built in %.2fs on %s; nprobe=%d meets recall@%d >= %.2f",
             report["kind"], report["nlist"], report["build_s"], report["built_on"], report["nprobe"], k,
             cfg.index.target_recall)
    for r in report["sweep"]:
        log.info("  nprobe %4d  recall@%d %.4f  %10.0f QPS (%.1fx exact)", r["nprobe"], k, r[f"recall@{k}"],
                 r["qps"], r["qps"] / report["exact_qps"], extra=FILE_ONLY)
    sweep = report["sweep"]  # the console gets the sweep as three rows
    log.info("  %-11s %s", "nprobe", " ".join(f"{r['nprobe']:>7d}" for r in sweep))
    log.info("  %-11s %s", f"recall@{k}", " ".join(f"{r[f'recall@{k}']:>7.4f}" for r in sweep))
    log.info("  %-11s %s   (exact search %.0f QPS)", "kQPS", " ".join(f"{r['qps'] / 1e3:>7.0f}" for r in sweep),
             report["exact_qps"])
    return report


if __name__ == "__main__":
    main()
