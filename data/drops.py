"""A dataset as it was known on a day: the weekly drops a retailer's trainer receives.

    python -m data.drops data=small drops.weeks=4           # the last 4 weeks of small as 4 drops
    python -m data.drops data=hm drops.until=2020-09-16 drops.out=datasets/hm-2020-09-16  # as known then

``cut(root, out, until)`` writes canonical tables (data/schema.py) under ``out`` holding what was known
before day ``until``: the transactions before it, the customers who had bought by then, and the catalogue
of then: the articles sold by then, plus, where the synthetic generator recorded launch days
(``_truth/articles.parquet``), those launched by then that had not sold yet. Each drop of a sequence
holds the one before it, so preparing drop k with ``prepare.parent`` = drop k-1's prepared dataset grows
the vocabularies: every id keeps its row, new customers and articles get new rows.

Columnar: the transactions are filtered batch by batch with pyarrow.compute and written in shards; the
customers and articles seen are collected as distinct ids. Each drop is published whole (data/staging.py).
"""

from __future__ import annotations

import datetime as dt
import logging

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data import config as _config  # noqa: F401  (registers the structured configs)
from data.io import (
    ShardWriter,
    fs_and_path,
    iter_transactions,
    join,
    read_articles,
    read_customers,
    read_table,
    table_url,
    write_json,
    write_parquet,
)
from data.schema import TRANSACTIONS
from data.staging import staged

log = logging.getLogger(__name__)
EPOCH = dt.date(1970, 1, 1)


def _day(value: str | int | dt.date) -> int:
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        value = dt.date.fromisoformat(value)
    return (value - EPOCH).days


def cut(root: str, out: str, until: str | int | dt.date, shard_rows: int = 2_000_000) -> dict:
    """Writes the dataset of ``root`` as known before day ``until`` to ``out``; returns its summary."""
    until_day = _day(until)
    with staged(out, "manifest.json") as tmp:
        writer = ShardWriter(table_url(tmp, TRANSACTIONS.name), TRANSACTIONS.schema, shard_rows)
        customers, articles, first, last = [], [], None, None
        for batch in iter_transactions(root):
            days = batch.column("t_dat").cast(pa.int32())
            keep = pc.less(days, until_day)
            kept = pa.Table.from_batches([batch]).filter(keep)
            if kept.num_rows == 0:
                continue
            writer.write(kept.select(TRANSACTIONS.names))
            customers.append(pc.unique(kept["customer_id"]))
            articles.append(pc.unique(kept["article_id"]))
            kd = kept["t_dat"].cast(pa.int32())
            lo, hi = pc.min(kd).as_py(), pc.max(kd).as_py()
            first = lo if first is None else min(first, lo)
            last = hi if last is None else max(last, hi)
        writer.close()
        if writer.rows == 0:
            raise ValueError(f"{root}/transactions: no transaction before {EPOCH + dt.timedelta(days=until_day)}")
        seen_c = pc.unique(pa.chunked_array(customers).combine_chunks())
        seen_a = pc.unique(pa.chunked_array(articles).combine_chunks())
        cust = read_customers(root)
        cust = cust.filter(pc.is_in(cust["customer_id"], value_set=seen_c))
        arts = read_articles(root)
        known = pc.is_in(arts["article_id"], value_set=seen_a)
        launched = _launched_by(root, arts, until_day)
        if launched is not None:
            known = pc.or_(known, launched)
        arts = arts.filter(known)
        write_parquet(cust, table_url(tmp, "customers"))
        write_parquet(arts, table_url(tmp, "articles"))
        summary = {"source": root, "until": str(EPOCH + dt.timedelta(days=until_day)),
                   "first_day": str(EPOCH + dt.timedelta(days=first)), "last_day": str(EPOCH + dt.timedelta(days=last)),
                   "transactions": writer.rows, "customers": cust.num_rows, "articles": arts.num_rows,
                   "articles_not_sold_yet": int(arts.num_rows - len(seen_a))}
        write_json(summary, join(tmp, "manifest.json"))
    return summary


def _launched_by(root: str, articles: pa.Table, until_day: int) -> pa.ChunkedArray | None:
    """Articles the synthetic generator launched before ``until_day`` (None without that record)."""
    url = join(root, "_truth", "articles.parquet")
    fs, path = fs_and_path(url)
    if not fs.exists(path):
        return None
    truth = read_table(url)
    if "launch_day" not in truth.column_names:
        return None
    launched = truth.filter(pc.less(truth["launch_day"], until_day))["article_id"]
    return pc.is_in(articles["article_id"], value_set=launched.combine_chunks())


def weekly(root: str, out: str, weeks: int, last_day: str | int | None = None) -> list[dict]:
    """The last ``weeks`` weeks of ``root`` as a sequence of drops ``out/week-01`` .. ``week-<weeks>``: drop k
    holds everything before the end of its week; the last drop is the whole dataset (through ``last_day``,
    default the data's own last day)."""
    if last_day is None:
        last_day = max(int(pc.max(b.column("t_dat").cast(pa.int32())).as_py()) for b in iter_transactions(root,
                                                                                                   ["t_dat"]))
    end = _day(last_day) + 1
    return [cut(root, join(out, f"week-{k + 1:02d}"), end - 7 * (weeks - 1 - k)) for k in range(weeks)]


@hydra.main(config_path="../conf", config_name="drops", version_base="1.3")
def main(cfg) -> list[dict]:
    from data.runinfo import start_run

    run_dir = start_run(cfg)
    dc = cfg.drops
    out = [cut(cfg.data.root, dc.out, dc.until)] if dc.until else weekly(cfg.data.root, dc.out, int(dc.weeks))
    write_json(out, join(run_dir, "report.json"))
    for d in out:
        log.info("drop until %s: %d transactions, %d customers, %d articles (%d not sold yet)", d["until"],
                 d["transactions"], d["customers"], d["articles"], d["articles_not_sold_yet"])
    return out


if __name__ == "__main__":
    main()
