"""Canonical tables -> training-ready example shards, vocabularies, feature tables and eval sets.

    python -m data.prepare                              # tiny, H&M week split
    python -m data.prepare data=small split=leave_last_n
    python -m data.prepare data=hm_scale split.test_days=7
    python -m data.prepare data=small prepare.out=datasets/small/week-2 prepare.parent=datasets/small/week-1

Writes under ``prepare.out`` (default ``<data.root>/prepared``):

    vocab/<feature>.parquet       raw value -> index (0 = OOV), with counts; grown from prepare.parent's
                                  when given (its rows kept, new values appended)
    features/customers.parquet    customer_idx + categorical feature indices
    features/articles.parquet     article_idx + categorical feature indices (+ hashed description tokens)
    examples/part-*.parquet       one row per training purchase: customer_idx, article_idx, day,
                                  history (last N articles strictly before day, training rows only);
                                  globally shuffled, row groups of prepare.row_group_rows
    item_freq.parquet             training examples per article_idx (``count``, for logQ correction) and
                                  training purchases over the whole training period (``sold``: which
                                  articles are scored by their features alone, trainer/model/cold.py)
                                  and the day of the first one (``first_sold``, -1: never)
    item_week_sales.parquet       training purchases per (week before the end of training, article_idx)
    eval/<val|test>.parquet       per evaluation customer: query day, history, target articles
    manifest.json                 sizes, cardinalities, split bounds, lineage of vocabulary versions,
                                  parent, counts, time and peak RSS (read as data/prepared.py's Prepared)

Memory: transactions are read as three int32 columns (12 bytes a row), so hm_scale's 31.8M rows need
well under 8 GB; examples are built and written one shard at a time.
"""

from __future__ import annotations

import hashlib
import logging
import time

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from omegaconf import DictConfig, OmegaConf

from data import config as _config  # noqa: F401  (registers the structured configs)
from data import features, split, vocab
from data.io import (
    iter_transactions,
    join,
    read_articles,
    read_customers,
    read_table,
    write_json,
    write_parquet,
)
from data.jagged import Jagged
from data.prepared import Lineage, Prepared
from data.runinfo import peak_rss_mb, progress_bar, start_run
from data.staging import staged

log = logging.getLogger(__name__)
EPOCH = np.datetime64("1970-01-01", "D")


def build_vocabs(customers: pa.Table, articles: pa.Table, parent: str | None = None) -> dict[str, pa.Table]:
    """Every vocabulary: built afresh in sorted order, or grown from the ``parent`` prepared dataset's
    (its rows kept, new values appended)."""
    values = {"customer_id": customers["customer_id"], "article_id": articles["article_id"]}
    for feat, col in features.CUSTOMER_VOCAB_COLUMNS.items():
        values[feat] = customers[col]
    for feat in features.ARTICLE_FEATURES:
        values[feat] = features.article_column(articles, feat)
    if parent is None:
        return {name: vocab.build(v) for name, v in values.items()}
    return {name: vocab.grow(vocab.load(parent, name), v) for name, v in values.items()}


# Options that fix what a feature index means: a grown dataset must share them with its parent.
FEATURE_OPTIONS = ("age_edges", "postal_buckets", "desc_tokens", "desc_buckets", "desc_max_tokens")


def check_parent(parent: Prepared, cfg) -> None:
    """A parent whose feature indices would mean something else here is refused, naming the option."""
    saved = (parent.get("config") or {})
    for name in FEATURE_OPTIONS:
        mine = OmegaConf.to_container(cfg[name]) if OmegaConf.is_config(cfg[name]) else cfg[name]
        if name in saved and saved[name] != mine:
            raise ValueError(f"prepare.parent={parent.url} was prepared with prepare.{name}={saved[name]!r}, "
                             f"this run has {mine!r}: a grown dataset keeps its parent's feature options")


def lineage(vocabs: dict[str, pa.Table], parent: Prepared | None) -> Lineage:
    """The parent's lineage (or its version, for a parent prepared before lineages were recorded) and
    this dataset's vocabulary version: a digest of every vocabulary in index order."""
    h = hashlib.sha256()
    for name in sorted(vocabs):
        h.update(f"{name}:{vocab.digest(vocabs[name])};".encode())
    sizes = {name: vocab.size(v) for name, v in sorted(vocabs.items())}
    before = Lineage()
    if parent is not None:
        before = parent.lineage if parent.version else Lineage(
            (version_of(parent.url),), (dict(parent.cardinalities),))
    listed = (before.listed_from or (None,) * len(before.versions)) + (
        parent.last_day + 1 if parent is not None else None,)  # new rows: in the shop after the parent's data
    return Lineage(before.versions + (h.hexdigest()[:16],), before.sizes + (sizes,), listed)


def version_of(url: str) -> str:
    """The vocabulary version of a prepared dataset, recomputed from its vocabulary files."""
    return lineage({name: vocab.load(url, name) for name in vocab_names()}, None).version


def vocab_names() -> list[str]:
    return ["customer_id", "article_id", *features.CUSTOMER_VOCAB_COLUMNS, *features.ARTICLE_FEATURES]


def keep_parent_rows(table: pa.Table, parent_url: str, name: str, key: str) -> tuple[pa.Table, int]:
    """``table`` plus the parent's feature rows of ids absent from it now (an article gone from the
    catalogue keeps its features, and its row its meaning); how many were carried."""
    old = read_table(join(parent_url, "features", f"{name}.parquet"))
    missing = pc.invert(pc.is_in(old[key], value_set=table[key].combine_chunks()))
    carried = old.filter(missing).select(table.column_names).cast(table.schema)
    return pa.concat_tables([table, carried]).sort_by(key), carried.num_rows


def read_interactions(root: str, vocabs: dict, progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """All transactions as compact (customer_idx, article_idx, day) arrays. Rows with a null key or day
    (``missing_<column>``) or an id outside the vocabularies (``unknown_<customer|article>``) are dropped
    and counted, first reason wins: rows_read = kept + the dropped counts."""
    cs, as_, ds = [], [], []
    counts = {"rows_read": 0, "missing_t_dat": 0, "missing_customer_id": 0, "missing_article_id": 0,
              "unknown_customer": 0, "unknown_article": 0}
    for batch in progress_bar(iter_transactions(root, columns=["t_dat", "customer_id", "article_id"]), progress,
                              desc="read transactions", unit="batch"):
        dropped = np.zeros(batch.num_rows, dtype=bool)
        for name in ("t_dat", "customer_id", "article_id"):
            null = pc.is_null(batch.column(name)).to_numpy(zero_copy_only=False)
            counts[f"missing_{name}"] += int((null & ~dropped).sum())
            dropped |= null
        c, _ = vocab.lookup(batch.column("customer_id"), vocabs["customer_id"])
        a, _ = vocab.lookup(batch.column("article_id"), vocabs["article_id"])
        d = pc.fill_null(batch.column("t_dat").cast(pa.int32()), 0).to_numpy(zero_copy_only=False)
        for name, oov in (("unknown_customer", c == vocab.OOV), ("unknown_article", a == vocab.OOV)):
            counts[name] += int((oov & ~dropped).sum())
            dropped |= oov
        counts["rows_read"] += batch.num_rows
        cs.append(c[~dropped]), as_.append(a[~dropped]), ds.append(d[~dropped].astype(np.int32))
    if counts["rows_read"] == 0:
        raise ValueError(f"{root}/transactions: no rows")
    return np.concatenate(cs), np.concatenate(as_), np.concatenate(ds), counts


def write_examples(out: str, c: np.ndarray, a: np.ndarray, d: np.ndarray, train_rows: np.ndarray,
                   log_: features.EventLog, cfg, same_day: bool, progress: bool, history_len: int) -> list[dict]:
    """Globally shuffled training examples, one shard at a time (history looked up per shard)."""
    rng = np.random.default_rng([cfg.seed, 104729])
    perm = train_rows[rng.permutation(len(train_rows))]
    shards = []
    n_shards = max(1, -(-len(perm) // cfg.shard_rows))
    for k in progress_bar(range(n_shards), progress, desc="write examples", unit="shard"):
        rows = perm[k * cfg.shard_rows:(k + 1) * cfg.shard_rows]
        hist = log_.history_before_rows(rows, history_len) if same_day else \
            log_.history(c[rows], d[rows], history_len)
        table = pa.table({
            "customer_idx": pa.array(c[rows], pa.int32()),
            "article_idx": pa.array(a[rows], pa.int32()),
            "day": pa.array(d[rows], pa.int32()),
            "history": features.list_array(hist),
        })
        url = join(out, "examples", f"part-{k:05d}.parquet")
        write_parquet(table, url, row_group_size=cfg.row_group_rows)
        shards.append({"file": f"examples/part-{k:05d}.parquet", "rows": len(rows)})
    return shards


def eval_set(c: np.ndarray, a: np.ndarray, d: np.ndarray, rows: np.ndarray, query_day: np.ndarray | int,
             log_: features.EventLog, n: int, vocabs: dict) -> pa.Table:
    """One row per customer with targets in ``rows``: distinct target articles, history before the query day."""
    pairs = np.unique((c[rows].astype(np.int64) << 32) | a[rows])
    cust, art = (pairs >> 32).astype(np.int32), (pairs & 0xFFFFFFFF).astype(np.int32)
    starts = np.flatnonzero(np.r_[True, cust[1:] != cust[:-1]])
    customers = cust[starts]
    t_offsets = np.r_[starts, len(cust)].astype(np.int64)
    if np.isscalar(query_day):
        qday = np.full(len(customers), query_day, dtype=np.int32)
    else:  # per target row: the customer's first target day
        first = np.full(int(c.max()) + 1, np.iinfo(np.int32).max, dtype=np.int64)
        np.minimum.at(first, c[rows], d[rows])
        qday = first[customers].astype(np.int32)
    hist = log_.history(customers, qday, n)
    cust_ids = vocabs["customer_id"]["value"].take(pa.array(customers - 1))
    art_ids = vocabs["article_id"]["value"].take(pa.array(art - 1))
    return pa.table({
        "customer_idx": pa.array(customers, pa.int32()),
        "customer_id": cust_ids,
        "day": pa.array(qday, pa.int32()),
        "history": features.list_array(hist),
        "targets": features.list_array(Jagged(t_offsets, art)),
        "target_article_ids": pa.ListArray.from_arrays(pa.array(t_offsets.astype(np.int32)), art_ids.combine_chunks()
                                                       if isinstance(art_ids, pa.ChunkedArray) else art_ids),
    })


def history_window(train_customers: np.ndarray, cfg) -> tuple[int, dict]:
    """The history length: ``prepare.history_len``, or with ``prepare.history_quantile`` > 0 that quantile of
    the customers' training interaction counts (rounded up, at most ``prepare.history_cap``), so the window
    follows the data's own histories. Returns it and what the report says of it."""
    counts = np.bincount(train_customers)
    counts = counts[counts > 0]
    n = int(cfg.history_len)
    if cfg.history_quantile > 0:
        n = int(min(cfg.history_cap, max(1, np.ceil(np.quantile(counts, cfg.history_quantile)))))
    covered = float(np.minimum(counts, n).sum() / max(counts.sum(), 1))
    return n, {"quantile": float(cfg.history_quantile), "cap": int(cfg.history_cap), "length": n,
               "median_customer": float(np.median(counts)) if len(counts) else 0.0,
               "share_of_training_within": round(covered, 4)}


def event_log(c: np.ndarray, d: np.ndarray, a: np.ndarray, rows: np.ndarray, cfg) -> features.EventLog:
    """The searchable log of ``rows`` histories are drawn from: in time order, or (``prepare.history_order=
    none``) in a random order per customer."""
    if cfg.history_order == "none":
        return features.UnorderedLog(c[rows], d[rows], a[rows], order=rows, seed=cfg.seed)
    return features.EventLog(c[rows], d[rows], a[rows], order=rows)


def within_day(data_cfg, cfg) -> bool:
    """Whether histories include the day's earlier rows: prepare.history_within_day, else data.sessions."""
    if cfg.history_within_day is not None:
        return bool(cfg.history_within_day)
    return bool(data_cfg.get("sessions", False))


def recent_sales(a: np.ndarray, d: np.ndarray, train: np.ndarray) -> dict:
    """Training purchases per (article, week), weeks counted back from the end of training (week -1:
    the last 7 training days), so the first week after training, where evaluation starts, sees exactly
    the sales of the week before it. The trainer reads an article's sales in the week before each
    example's week (trainer/model/sales.py). Columnar: one sort of (week, article) keys."""
    end = int(d[train].max()) + 1
    weeks = -(-(end - int(d[train].min())) // 7)
    n_items = int(a.max(initial=0)) + 1
    keys, counts = np.unique((d[train].astype(np.int64) - end) // 7 * n_items + a[train], return_counts=True)
    table = pa.table({"week": pa.array((keys // n_items).astype(np.int32)),  # floor division: -1, -2, ...
                      "article_idx": pa.array((keys % n_items).astype(np.int32)),
                      "count": pa.array(counts.astype(np.int32))})
    return {"table": table, "train_end": str(EPOCH + end), "weeks": int(weeks)}


def prepare(data_cfg, split_cfg, cfg, progress: bool = True) -> dict:
    """Writes everything aside and publishes it in place of ``prepare.out`` whole, the manifest last
    (data/staging.py): a reader never sees one run's vocabularies beside another run's examples."""
    with staged(cfg.out, "manifest.json") as out:
        return _prepare(data_cfg, split_cfg, cfg, out, progress)


def _prepare(data_cfg, split_cfg, cfg, out: str, progress: bool) -> dict:
    t0 = time.perf_counter()
    same_day = within_day(data_cfg, cfg)
    root = data_cfg.root
    parent = Prepared.read(cfg.parent) if cfg.parent else None
    if parent is not None:
        check_parent(parent, cfg)
    customers, articles = read_customers(root), read_articles(root)
    vocabs = build_vocabs(customers, articles, parent.url if parent else None)
    for name, v in vocabs.items():
        vocab.save(v, out, name)
    cust_table, cust_cards = features.customer_table(customers, vocabs, cfg)
    art_table, art_cards = features.article_table(articles, vocabs, cfg)
    grown = {}
    if parent is not None:
        cust_table, grown["customers_carried"] = keep_parent_rows(cust_table, parent.url, "customers", "customer_idx")
        art_table, grown["articles_carried"] = keep_parent_rows(art_table, parent.url, "articles", "article_idx")
        grown.update({f"new_{name}": vocab.size(v) - parent.cardinalities[name]
                      for name, v in vocabs.items() if name in ("customer_id", "article_id")})
    write_parquet(cust_table, join(out, "features", "customers.parquet"))
    write_parquet(art_table, join(out, "features", "articles.parquet"))
    del customers, articles

    c, a, d, read_counts = read_interactions(root, vocabs, progress)
    labels, bounds = split.assign(split_cfg.protocol, c, d, split_cfg, article=a)
    train_rows = np.flatnonzero(labels == split.TRAIN)
    if len(train_rows) == 0:
        raise ValueError(f"split {split_cfg.protocol}: no training rows")
    unordered = cfg.history_order == "none"
    train_log = event_log(c, d, a, train_rows, cfg)
    sold = np.bincount(a[train_rows], minlength=art_cards["article_id"])  # over all of training
    first_sold = features.first_sale_days(a[train_rows], d[train_rows], art_cards["article_id"])
    if cfg.train_days > 0:  # examples from the most recent days only; histories still see all of training
        recent_from = int(d[train_rows].max()) - cfg.train_days + 1
        train_rows = train_rows[d[train_rows] >= recent_from]

    freq = np.bincount(a[train_rows], minlength=art_cards["article_id"])
    write_parquet(pa.table({"article_idx": pa.array(np.arange(len(freq), dtype=np.int32)),
                            "count": pa.array(freq.astype(np.int64)),
                            "sold": pa.array(sold.astype(np.int64)),
                            "first_sold": pa.array(first_sold)}), join(out, "item_freq.parquet"))
    sales = recent_sales(a, d, labels == split.TRAIN)
    write_parquet(sales.pop("table"), join(out, "item_week_sales.parquet"))
    history_len, window = history_window(c[labels == split.TRAIN], cfg)
    shards = write_examples(out, c, a, d, train_rows, train_log, cfg, same_day or unordered, progress, history_len)

    evals = {}
    for period, label in split.PERIODS.items():
        rows = np.flatnonzero(labels == label)
        if len(rows) == 0:
            continue
        if split_cfg.protocol == "week":
            start = bounds["val_start"] if period == "val" else bounds["test_start"]
            known = np.flatnonzero(d < start)  # everything before the period: train (+ val for test)
            source = train_log if period == "val" else event_log(c, d, a, known, cfg)
            table = eval_set(c, a, d, rows, start, source, history_len, vocabs)
        elif split_cfg.protocol in ("leave_last_n", "holdout"):
            # test queries know the validation rows too (they come before); with history_within_day a
            # query sees everything before its targets, same-day rows included
            known = np.flatnonzero(labels != split.TEST)
            source = train_log if period == "val" else event_log(c, d, a, known, cfg)
            day = int(d.max()) + 1 if same_day or unordered or split_cfg.protocol == "holdout" else d
            table = eval_set(c, a, d, rows, day, source, history_len, vocabs)
        else:  # random: not temporal; history is the customer's latest training purchases
            table = eval_set(c, a, d, rows, int(d.max()) + 1, train_log, history_len, vocabs)
        write_parquet(table, join(out, "eval", f"{period}.parquet"))
        evals[period] = {"customers": table.num_rows, "target_rows": int(len(rows)),
                         "distinct_targets": int(pc.sum(pc.list_value_length(table["targets"])).as_py())}

    day_str = {k: (str(EPOCH + v) if k.endswith(("_start", "_day")) and v is not None else v)
               for k, v in bounds.items()}
    manifest = {
        "root": root,
        "split": {"protocol": split_cfg.protocol, **day_str,
                  "first_day": str(EPOCH + int(d.min())), "last_day": str(EPOCH + int(d.max()))},
        "cardinalities": {**cust_cards, **art_cards},
        "customer_features": list(features.CUSTOMER_FEATURES),
        "article_features": list(features.ARTICLE_FEATURES) + (["desc_tokens"] if cfg.desc_tokens else []),
        "recent_sales": sales,
        "lineage": lineage(vocabs, parent).to_json(),
        "parent": ({"prepared": parent.url, "version": parent.version or version_of(parent.url), **grown}
                   if parent is not None else None),
        "history_len": history_len,
        "history_window": window,
        "history_within_day": same_day,
        "history_order": str(cfg.history_order),
        "row_group_rows": cfg.row_group_rows,
        "examples": {"rows": int(len(train_rows)), "shards": shards},
        "eval": evals,
        "transactions": {**read_counts, "kept": int(len(c)), "train": int((labels == split.TRAIN).sum()),
                         "train_examples": int(len(train_rows))},
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_mb": peak_rss_mb(),
        "config": OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else None,
    }
    write_json(manifest, join(out, "manifest.json"))
    return manifest


@hydra.main(config_path="../conf", config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    run_dir = start_run(cfg)
    m = prepare(cfg.data, cfg.split, cfg.prepare)
    write_json(m, join(run_dir, "report.json"))
    t = m["transactions"]
    dropped = {k: v for k, v in t.items() if k.startswith(("missing_", "unknown_")) and v}
    log.info("prepare %s (%s split): %d examples in %d shards, eval %s; transactions dropped: %s; %.1fs, "
             "peak RSS %d MB", cfg.data.name, cfg.split.protocol, m["examples"]["rows"],
             len(m["examples"]["shards"]), {k: v["customers"] for k, v in m["eval"].items()},
             dropped or "none", m["seconds"], m["peak_rss_mb"])
    return m


if __name__ == "__main__":
    main()
