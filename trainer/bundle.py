"""The serving bundle: a trained run as one self-contained, versioned directory (trainer/serving/bundle.py
loads it and answers; trainer/serve.py serves it over HTTP).

    python -m trainer.bundle data=small                    # the run's selected checkpoint, INT8 tables
    python -m trainer.bundle data=small bundle.int8=false  # fp32 tables
    python -m trainer.bundle data=small bundle.add_articles=datasets/small/articles.parquet  # new articles

Written whole (data/staging.py) into ``<run dir>/output/``:
  query_tower.pt2    the query tower as a ``torch.export`` program (dynamic batch), its tables row-wise
                     INT8 or fp32, loadable with torch alone (trainer/serving/tower.py)
  customers.parquet  per customer row: the raw id, the model's customer features, the last purchases as
                     of the bundle's day (``history``, oldest first) and the other articles bought before
                     it (``older``: the two together are what ``exclude_seen`` leaves out)
  item_tower.pt2     the item tower for articles known by their features alone (the OOV id in the id's
                     place), fp32, with ``article_vocab.parquet`` (feature, raw value, index): articles
                     added to the catalogue after training are placed with it (``add_articles``)
  items.parquet      per article row: raw id, title
  index.faiss        FAISS IVF-Flat index over the articles' scoring vectors (with the recent-sales
                     column; row i = article row i + 1): the one copy of the vectors, exact search too
  manifest.json      run, step, fingerprint, prepared-data digest, the day, the scoring terms, the
                     popular articles for cold start, the run's exclude_seen (a request's default),
                     package versions, creation time, each file's size and SHA-256 (written last: the
                     commit mark)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from importlib import metadata

import faiss
import hydra
import numpy as np
import pyarrow as pa
import torch
from omegaconf import DictConfig

from data import features, vocab
from data.catalogue import ARTICLE_FEATURES
from data.io import join, read_articles, read_json, read_table, write_json, write_parquet
from data.jagged import Jagged
from data.prepare import read_interactions
from data.runinfo import start_run
from data.schema import ARTICLES
from data.staging import output_of, staged
from trainer import config as _train_config  # noqa: F401  (registers the bundle schema)
from trainer.loop.runs import load_run
from trainer.model.managed import served_tables
from trainer.model.towers import unwrap
from trainer.parallel import distributed as D
from trainer.retrieval import ivf
from trainer.retrieval.rerank import padded
from trainer.retrieval.search import seen_lists
from trainer.serving.bundle import FORMAT, MANIFEST, Bundle, file_sha256, item_vectors
from trainer.serving.tower import ServingItemTower, ServingQueryTower, export_item_program, export_program

log = logging.getLogger(__name__)

PACKAGES = ("torch", "faiss-cpu", "faiss-gpu", "pyarrow", "numpy")


def full_tables(model) -> dict[str, torch.Tensor]:
    """Every embedding table whole, from a model sharded on one process."""
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[-1] != "weight" or "embedding_bags" not in parts:
            continue
        if hasattr(value, "local_shards"):  # a ShardedTensor: all its shards are here on one rank
            whole = torch.zeros(tuple(value.size()), dtype=torch.float32)
            for s in value.local_shards():
                (r0, c0), (nr, nc) = s.metadata.shard_offsets, s.metadata.shard_sizes
                whole[r0:r0 + nr, c0:c0 + nc] = s.tensor.detach().float().cpu()
            value = whole
        out[parts[-2]] = value.detach().float().cpu()
    return out


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def customer_lists(root: str, vocabs: dict, as_of: str | None, history_len: int, n_customers: int):
    """(day, history, older, interactions) of every customer row as of ``as_of`` (default: the day after the
    data's last transaction, as trainer.recommend): the last purchases, oldest first, and the other distinct
    articles bought before the day (a customer's bought articles are both lists together: kept apart,
    an article is stored once)."""
    c, a, d, _ = read_interactions(root, vocabs, progress=False)
    day = int(np.datetime64(as_of, "D").astype(np.int64)) if as_of else int(d.max()) + 1
    before = d < day
    c, a, d = c[before], a[before], d[before]
    rows = np.arange(n_customers, dtype=np.int64)
    history = features.EventLog(c, d, a).history(rows, np.full(n_customers, day, np.int32), history_len)
    seen = seen_lists(c, a, rows)
    width = int(max(seen.values.max(initial=0), history.values.max(initial=0))) + 1
    in_history = np.isin(seen.owners() * width + seen.values, history.owners() * width + history.values)
    older = Jagged.from_lengths(np.bincount(seen.owners()[~in_history], minlength=n_customers),
                                seen.values[~in_history])
    return day, history, older, (c, a, d)


@torch.no_grad()
def choose_nprobe(tower, index, items: np.ndarray, history, cust_feats: np.ndarray, time_features: list,
                  width: int, bc) -> tuple[int, list]:
    """``bundle.nprobe``, or the smallest that meets ``bundle.target_recall`` against exact search for a
    sample of customers with a history (their queries from the tower just built)."""
    if bc.nprobe:
        return int(bc.nprobe), []
    with_history = np.flatnonzero(history.lengths() > 0)
    rows = np.random.default_rng(bc.seed).permutation(with_history)[:bc.sweep_queries]
    if len(rows) == 0:
        return int(index.nlist), []
    hist, lengths = padded(history.take(rows), width)
    q, _ = tower(torch.from_numpy(rows), torch.from_numpy(cust_feats[:, rows].T.astype(np.int64)),
                 torch.from_numpy(hist), torch.from_numpy(lengths.astype(np.int64)),
                 torch.tensor([time_features] * len(rows), dtype=torch.float32))
    report = ivf.sweep(index, items[1:], q.numpy(), 12)
    return ivf.choose_nprobe(report, float(bc.target_recall), 12), report


def index_stage_index(index_dir: str | None, run, art_ids: np.ndarray, items: np.ndarray):
    """(index, its file, its report) of the index stage at ``index_dir`` when it indexes this run's checkpoint
    with IVF-Flat (the bundle's vectors live in its index); None when there is none; an error when there is one
    of another run, another kind or other articles (serving must not differ from what evaluate measured)."""
    if not index_dir or not ivf.exists(index_dir):
        return None
    out = output_of(index_dir)
    report = read_json(join(out, "index_report.json"))
    ivf.check_matches(index_dir, run.fingerprint_id, run.step)
    if report.get("kind") != "ivf_flat":
        raise RuntimeError(f"{index_dir} is a {report.get('kind')} index; a bundle serves IVF-Flat (its vectors "
                           "are the bundle's): index.kind=ivf_flat, or bundle index_dir=null to build its own")
    index, ids = ivf.load(index_dir)
    if not np.array_equal(ids, art_ids[1:]):
        raise RuntimeError(f"{index_dir} holds other articles, or in another order, than the run's catalogue")
    vectors = item_vectors(index)
    if vectors.shape != items.shape or not np.allclose(vectors[1:], items[1:], atol=1e-5):
        raise RuntimeError(f"{index_dir} holds other item vectors than the checkpoint gives")
    return index, join(out, "index.faiss"), report


def bundle(cfg: DictConfig, run_dir: str) -> dict:
    if D.world_size() > 1:
        raise RuntimeError("trainer.bundle runs in one process (python -m trainer.bundle)")
    bc = cfg.bundle
    embedder, run = load_run(str(cfg.train_dir), str(cfg.checkpoint), device="cpu")
    model = unwrap(embedder.model)
    prepared, ds = embedder.prepared, embedder.ds
    vocabs = {name: vocab.load(prepared, name) for name in ("customer_id", "article_id")}
    day, history, older, (c, a, d) = customer_lists(ds.root, vocabs, bc.as_of, ds.history_len, ds.n_customers)

    items = embedder.items().float().cpu()  # the scoring vectors, with the recent-sales column
    d_towers = items.shape[1] - (1 if model.sales is not None else 0)
    mean_item = items[1:, :d_towers].mean(0)  # as the Embedder's level: the OOV row left out
    weights = full_tables(embedder.model)
    if model.managed is not None:  # the managed tables by vocabulary id, through their map
        weights = served_tables(model.managed, weights, ds.cardinalities)
    tower = ServingQueryTower(model, weights, list(embedder.tables.customer_features), mean_item, bool(bc.int8))
    width = ds.history_len if tower.sequence is None else max(tower.positions, 1)
    program = export_program(tower, len(tower.feature_names), width)
    item_tower = ServingItemTower(model, weights)
    item_program = export_item_program(item_tower)
    article_vocab = pa.concat_tables([pa.table({
        "feature": pa.array([name] * v.num_rows, pa.string()), "value": v["value"].cast(pa.string()),
        "index": v["index"]}) for name in item_tower.feature_names for v in [vocab.load(prepared, name)]]) \
        if item_tower.feature_names else pa.table({"feature": pa.array([], pa.string()),
                                                   "value": pa.array([], pa.string()), "index": pa.array([], pa.int32())})
    desc = None
    if "desc_tokens" in item_tower.item_features:
        desc = {"buckets": ds.cardinalities["desc_tokens"],
                "max_tokens": int((ds.get("config") or {}).get("desc_max_tokens", 0) or 0)}
    catalogue_info = {"features": item_tower.feature_names,
                      "columns": {f: ARTICLE_FEATURES[f] for f in item_tower.feature_names}, "desc": desc,
                      "new_article_score": model.sales.new_article_score() if model.sales is not None else None}

    art_ids = np.r_[-1, vocabs["article_id"]["value"].to_numpy()]
    arts = read_articles(ds.root)
    titles = dict(zip(arts["article_id"].to_pylist(), arts["prod_name"].to_pylist()))
    item_np = items.numpy()
    rank_feats = [list(embedder.tables.customer_features).index(f) for f in tower.feature_names]
    cust_feats = embedder.tables.customer[rank_feats] if rank_feats else np.zeros((0, ds.n_customers), np.int32)
    time_features = [float(v[0]) for v in features.time_of_year(np.array([day]))]
    staged_index = index_stage_index(cfg.index_dir, run, art_ids, item_np)
    if staged_index is not None:  # the index evaluate measured, at its nprobe: served as it is
        index, index_file, index_info = staged_index
        nprobe, sweep = int(index_info["nprobe"]), index_info.get("sweep", [])
    else:
        index = ivf.build(item_np[1:], nlist=bc.nlist or None, use_gpu=None if bc.gpu is None else bool(bc.gpu),
                          seed=bc.seed)
        if not np.array_equal(item_vectors(index)[1:], item_np[1:]):  # the bundle keeps the vectors there only
            raise RuntimeError("the IVF index does not hold the item vectors exactly")
        nprobe, sweep = choose_nprobe(tower, index, item_np, history, cust_feats, time_features, width, bc)
        index_file, index_info = None, {}
    popular = features.best_sellers(a, d, day, len(art_ids), bc.popular)

    repeats = model.repeats
    terms = {"recent_sales": model.sales is not None,
             "buying_again": None if repeats is None else {
                 "bonus": [float(x) for x in repeats.bonus()], "mixture": repeats.mixture,
                 "temperature": float(embedder.temperature)}}
    out_dir = output_of(run_dir)
    with staged(out_dir, MANIFEST) as out:
        torch.export.save(program, os.path.join(out, "query_tower.pt2"))
        torch.export.save(item_program, os.path.join(out, "item_tower.pt2"))
        write_parquet(article_vocab, join(out, "article_vocab.parquet"))
        cust_vocab = vocabs["customer_id"]["value"].combine_chunks() if isinstance(
            vocabs["customer_id"]["value"], pa.ChunkedArray) else vocabs["customer_id"]["value"]
        columns = {"customer_id": pa.concat_arrays([pa.nulls(1, cust_vocab.type), cust_vocab]).cast(pa.string()),
                   "history": features.list_array(history), "older": features.list_array(older)}
        for j, name in enumerate(tower.feature_names):
            columns[name] = pa.array(cust_feats[j], pa.int32())
        write_parquet(pa.table(columns), join(out, "customers.parquet"))
        write_parquet(pa.table({
            "article_id": pa.array(art_ids, pa.int64()),
            "title": pa.array([titles.get(int(x)) for x in art_ids], pa.string())}),  # vectors: in the index
            join(out, "items.parquet"))
        if index_file is not None:  # byte for byte: the same digest as the index stage's
            shutil.copyfile(index_file, os.path.join(out, "index.faiss"))
        else:
            faiss.write_index(index, os.path.join(out, "index.faiss"))
        index_digest = ivf.file_digest(os.path.join(out, "index.faiss"))
        files = {name: {"bytes": os.path.getsize(os.path.join(out, name)), "sha256": file_sha256(os.path.join(out, name))}
                 for name in sorted(os.listdir(out))}
        report = {
            "format": FORMAT, "run": run.train_dir, "checkpoint": run.checkpoint, "step": run.step,
            "fingerprint": run.fingerprint_id, "data_digest": run.data_digest, "as_of": str(np.datetime64(day, "D")),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions(),
            "int8": bool(bc.int8), "tower": {"features": tower.feature_names, "history_width": width,
                                              "time": time_features},
            "scoring": terms, "exclude_seen": bool(bc.exclude_seen), "index": {"nlist": int(index.nlist), "nprobe": nprobe, "sweep": sweep, "digest": index_digest,
                                 "source": str(cfg.index_dir) if index_file is not None else "built by the bundle"},
            "popular": [int(x) for x in popular], "customers": ds.n_customers, "articles": int(len(art_ids) - 1),
            "catalogue": catalogue_info, "files": files}
        write_json(report, join(out, MANIFEST))
    size = sum(f["bytes"] for f in files.values())
    warm = np.flatnonzero(history.lengths() > 0)
    report["example_customer"] = str(columns["customer_id"][int(warm[0])]) if len(warm) else None
    report["example_history"] = [int(art_ids[r]) for r in history.row(int(warm[0]))[-2:]] if len(warm) else []
    log.info("bundle of run %s step %d (fingerprint %s, %s tables) as of %s: %.1f MB in %s", run.train_dir,
             run.step, run.fingerprint_id, "INT8" if bc.int8 else "fp32", report["as_of"], size / 1e6, out_dir)
    return report


def add_articles(base: str, articles: pa.Table, out_dir: str) -> dict:
    """A bundle like ``base`` (a bundle's output directory) with the catalogue rows it does not know
    appended, each placed by its features alone (trainer/serving/bundle.py ``Bundle.add_articles``): no
    retrain. Published whole at ``out_dir`` (it may be ``base``: a running service swaps it in)."""
    b = Bundle.load(base)
    before = len(b.article_ids) - 1
    added = b.add_articles(articles)
    with staged(out_dir, MANIFEST) as out:
        for name in b.manifest["files"]:
            if name not in ("items.parquet", "index.faiss"):
                shutil.copy2(os.path.join(base, name), os.path.join(out, name))
        write_parquet(pa.table({"article_id": pa.array(b.article_ids, pa.int64()),
                                "title": pa.array(b.titles, pa.string())}), join(out, "items.parquet"))
        faiss.write_index(b.index, os.path.join(out, "index.faiss"))
        files = {name: {"bytes": os.path.getsize(os.path.join(out, name)), "sha256": file_sha256(os.path.join(out, name))}
                 for name in sorted(os.listdir(out))}
        catalogue_info = {**b.manifest["catalogue"], "added": int(b.manifest["catalogue"].get("added", 0)) + added}
        report = {**b.manifest, "articles": before + added, "catalogue": catalogue_info, "files": files,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json(report, join(out, MANIFEST))
    log.info("%d of %d catalogue rows were new articles: placed by their features and added to the bundle "
             "(%d articles now) in %s", added, articles.num_rows, before + added, out_dir)
    return {**report, "added": added, "example_customer": None}


def read_catalogue(url: str) -> pa.Table:
    """An articles table: a canonical ``articles.parquet``, or a dataset root holding one."""
    return read_articles(url) if not url.endswith(".parquet") else read_table(url, ARTICLES)


@hydra.main(config_path="../conf", config_name="bundle", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    run_dir = start_run(cfg)
    try:
        if cfg.bundle.add_articles:
            base = str(cfg.bundle.base or output_of(run_dir))
            return add_articles(base, read_catalogue(str(cfg.bundle.add_articles)), base)
        report = bundle(cfg, run_dir)
    finally:
        D.shutdown()
    log.info("serve it:  %s -m trainer.serve data=%s serve.bundle=%s", sys.executable, cfg.data.name,
             output_of(run_dir))
    log.info("ask it:    curl -s localhost:8000/recommend -H 'Content-Type: application/json' "
             "-d '{\"customer_id\": \"%s\", \"k\": 12}'", report["example_customer"])
    if report.get("example_history"):
        log.info("or:        curl -s localhost:8000/recommend -H 'Content-Type: application/json' "
                 "-d '{\"history\": %s, \"k\": 12}'", json.dumps(report["example_history"]))
    return report


if __name__ == "__main__":
    main()
