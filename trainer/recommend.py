"""Recommendations from a trained run: top-K articles for customers, or an H&M submission file.

    python -m trainer.recommend data=small 'recommend.customers=[<customer_id>, ...]'   # prints names
    python -m trainer.recommend data=small recommend.submission=true                   # every customer

Each customer's query uses their last ``history_len`` purchases over all transactions, so the
recommendations are for the days after the data ends (``recommend.as_of=YYYY-MM-DD``: as of that day,
from the data before it). Ranking is the Retriever's (trainer/retrieval/retriever.py): the index stage's FAISS
index when it exists, else exact search over the model's item vectors. Cold-start customers
(an id the model has never seen, or no purchase history) get the most popular articles of the last
week instead; how many did is reported (and logged) with the output.

The submission is ``customer_id,prediction`` with 12 space-separated 10-digit article ids per row.
"""

from __future__ import annotations

import logging

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from omegaconf import DictConfig

from data import features, vocab
from data.io import atomic_open, fs_and_path, join, read_articles, read_customers, write_json
from data.prepare import read_interactions
from data.runinfo import start_run
from data.schema import format_article_id
from trainer import config as _train_config  # noqa: F401
from trainer.loop.runs import load_run
from trainer.parallel import distributed as D
from trainer.retrieval import ivf as ix
from trainer.retrieval.retriever import Retriever
from trainer.retrieval.search import seen_lists

log = logging.getLogger(__name__)


def recommend(cfg: DictConfig, run_dir: str) -> dict:
    rc = cfg.recommend
    embedder, run = load_run(str(cfg.train_dir), str(cfg.checkpoint))
    prepared, root = embedder.prepared, embedder.ds.root  # the tables the model was prepared from
    vocabs = {name: vocab.load(prepared, name) for name in ("customer_id", "article_id")}
    art_ids = np.r_[-1, vocabs["article_id"]["value"].to_numpy()]  # article_idx -> article_id

    if rc.submission:
        raw = read_customers(root)["customer_id"] if not rc.customers_file else pcsv.read_csv(
            fs_and_path(rc.customers_file)[1]).column("customer_id")
    else:
        raw = pa.array([str(c) for c in rc.customers], pa.string())
    raw = raw.combine_chunks() if isinstance(raw, pa.ChunkedArray) else raw
    cust_idx, _ = vocab.lookup(raw, vocabs["customer_id"])

    c, a, d, _ = read_interactions(root, vocabs, progress=False)
    day = int(np.datetime64(rc.as_of, "D").astype(np.int64)) if rc.as_of else int(d.max()) + 1
    before = d < day  # what was known on the day
    c, a, d = c[before], a[before], d[before]
    log_ = features.EventLog(c, d, a)
    history = log_.history(cust_idx, np.full(len(cust_idx), day, np.int32), embedder.ds.history_len)
    h_len = history.lengths()
    popular = features.best_sellers(a, d, day, len(art_ids), rc.k)

    unknown = cust_idx == vocab.OOV
    no_history = ~unknown & (h_len == 0)
    warm = np.flatnonzero(~unknown & ~no_history)
    ranked = np.tile(popular, (len(cust_idx), 1))

    index_dir = cfg.index_dir if cfg.index_dir and ix.exists(cfg.index_dir) else None
    if index_dir:
        ix.check_matches(index_dir, run.fingerprint_id, run.step)
    retriever = Retriever.from_embedder(embedder, index_dir=index_dir)
    how = f"IVF index {index_dir}" if index_dir else "exact search"
    seen = seen_lists(c, a, cust_idx) if rc.exclude_seen else None
    chunk = 4096
    for lo in range(0, len(warm), chunk):
        rows = warm[lo:lo + chunk]
        recent = history.take(rows)
        q = embedder.queries(cust_idx[rows], np.full(len(rows), day), recent)
        own = seen.take(rows) if seen is not None else None
        idx = retriever.rank(embedder.as_queries(q, retriever.items, levels=retriever.buys_again(own)), rc.k, own,
                             recent)
        ranked[rows] = np.clip(idx, 0, None)

    counts = {"customers": int(len(cust_idx)), "model": int(len(warm)), "cold_unknown_id": int(unknown.sum()),
              "cold_no_history": int(no_history.sum()), "train_dir": run.train_dir, "checkpoint": run.checkpoint,
              "step": run.step, "fingerprint": run.fingerprint_id, "retrieval": how,
              "exclude_seen": bool(rc.exclude_seen), "as_of": str(np.datetime64(day, "D"))}
    log.info("recommendations: %s", counts)
    ids = art_ids[ranked]
    if rc.submission:
        k = ids.shape[1]
        lists = pa.ListArray.from_arrays(pa.array(np.arange(0, ids.size + 1, k, dtype=np.int32)),
                                         format_article_id(pa.array(ids.reshape(-1), pa.int64())))
        text = pc.binary_join(lists, " ")
        out = pa.table({"customer_id": raw, "prediction": text})
        url = rc.output or join(run_dir, "submission.csv")
        with atomic_open(url, "wb") as f:
            f.write(b"customer_id,prediction\n")  # H&M's header, unquoted
            pcsv.write_csv(out, f, pcsv.WriteOptions(include_header=False, quoting_style="none"))
        counts["submission"] = url
    else:
        arts = read_articles(root)
        names = dict(zip(arts["article_id"].to_pylist(), arts["prod_name"].to_pylist()))
        for cid, row, cold in zip(raw.to_pylist(), ids.tolist(), (unknown | no_history).tolist()):
            print(f"{cid}{'  (cold start: popular articles)' if cold else ''}")
            for rank, aid in enumerate(row, 1):
                print(f"  {rank:>2}. {format_article_id(pa.array([aid], pa.int64()))[0]}  {names.get(aid, '?')}")
        counts["recommendations"] = {cid: row for cid, row in zip(raw.to_pylist(), ids.tolist())}
    write_json(counts, join(run_dir, "recommend_report.json"))
    return counts


@hydra.main(config_path="../conf", config_name="recommend", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    run_dir = start_run(cfg)
    try:
        return recommend(cfg, run_dir)
    finally:
        D.shutdown()


if __name__ == "__main__":
    main()
