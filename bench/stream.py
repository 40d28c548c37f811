"""Stream benchmark: examples/s of data.stream, side by side with
  (a) a raw pyarrow.parquet scan of the same shards (the ceiling: decode only, no batches), and
  (b) the notebook way: a per-row torch Dataset over raw transactions with Python-dict id and feature
      lookups and default collation.

    .venv/bin/python bench/stream.py                      # on datasets/small/prepared
    .venv/bin/python bench/stream.py --prepared datasets/hm_scale/prepared --workers 2

Goals: stream >= 0.5x raw scan, >= 20x the per-row Dataset.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.io import iter_transactions, read_articles, read_customers  # noqa: E402
from data.loader import make_loader  # noqa: E402
from data.stream import ExampleStream  # noqa: E402


def stream_rate(prepared: str, batch: int, workers: int, limit: int, world: int = 1) -> float:
    """Steady state: the clock starts once the first batch is out (read-ahead threads warmed up). With
    ``world`` > 1: rank 0's stream of a global batch ``batch`` (its rows: batch / world a step)."""
    s = ExampleStream(prepared, batch, num_workers=workers, world_size=world)
    it = iter(make_loader(s))
    next(it)
    n, t0 = 0, time.perf_counter()
    for b in it:
        n += len(b)
        if n >= limit:
            break
    return n / (time.perf_counter() - t0)


def raw_scan_rate(prepared: str, limit: int, group: int = 8) -> float:
    """Reads the same row groups with pyarrow, several at a time (multi-threaded, as fast as pyarrow
    reads them), and converts the columns to numpy: nothing else."""
    files = sorted((pathlib.Path(prepared) / "examples").glob("*.parquet"))
    pq.ParquetFile(files[0]).read_row_group(0)  # warm up as the stream is (file open, first decode)
    n, t0 = 0, time.perf_counter()
    for f in files:
        pf = pq.ParquetFile(f)
        for lo in range(0, pf.num_row_groups, group):
            t = pf.read_row_groups(range(lo, min(lo + group, pf.num_row_groups))).combine_chunks()
            for c in ("customer_idx", "article_idx", "day"):
                t[c].to_numpy()
            t["history"].chunk(0).values.to_numpy()
            n += t.num_rows
            if n >= limit:
                return n / (time.perf_counter() - t0)
    return n / (time.perf_counter() - t0)


class NotebookDataset(torch.utils.data.Dataset):
    """How typical two-tower notebooks feed training: rows of raw ids, dicts for everything."""

    def __init__(self, root: str, n_rows: int, history_len: int = 20):
        cust = read_customers(root).to_pylist()
        arts = read_articles(root).to_pylist()
        self.cust_index = {c["customer_id"]: i + 1 for i, c in enumerate(cust)}
        self.art_index = {a["article_id"]: i + 1 for i, a in enumerate(arts)}
        self.cust_feat = {c["customer_id"]: (c["age"] or 0, hash(c["club_member_status"]) % 10,
                                             hash(c["fashion_news_frequency"]) % 10, hash(c["postal_code"]) % 65536)
                          for c in cust}
        self.art_feat = {a["article_id"]: (a["product_type_no"], a["colour_group_code"], a["department_no"],
                                           a["section_no"], a["garment_group_no"]) for a in arts}
        batch = next(iter_transactions(root, batch_size=n_rows))
        self.rows = batch.to_pylist()
        self.history: dict[str, list[int]] = {}
        self.hist_of_row = []
        for r in self.rows:  # history as the notebook builds it: a growing per-customer list
            h = self.history.setdefault(r["customer_id"], [])
            self.hist_of_row.append(list(h[-history_len:]))
            h.append(self.art_index[r["article_id"]])
        self.history_len = history_len

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        hist = self.hist_of_row[i]
        hist = hist + [0] * (self.history_len - len(hist))
        doy = r["t_dat"].timetuple().tm_yday / 365.25
        return {
            "customer": torch.tensor(self.cust_index[r["customer_id"]]),
            "customer_feat": torch.tensor(self.cust_feat[r["customer_id"]]),
            "history": torch.tensor(hist),
            "time": torch.tensor([math.sin(2 * math.pi * doy), math.cos(2 * math.pi * doy)]),
            "article": torch.tensor(self.art_index[r["article_id"]]),
            "article_feat": torch.tensor(self.art_feat[r["article_id"]]),
        }


def notebook_rate(root: str, batch: int, limit: int) -> float:
    ds = NotebookDataset(root, limit)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0)
    n, t0 = 0, time.perf_counter()
    for b in loader:
        n += len(b["article"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepared", default=str(ROOT / "datasets/small/prepared"))
    ap.add_argument("--root", default=None, help="canonical tables (default: parent of --prepared)")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rows", type=int, default=600_000)
    ap.add_argument("--notebook-rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--world", type=int, nargs="*", default=[2, 4],
                    help="also time rank 0 of these world sizes (each rank decodes every window, keeps its rows)")
    args = ap.parse_args()
    root = args.root or str(pathlib.Path(args.prepared).parent)
    torch.set_num_threads(1)
    # Interleaved rounds, median of each: the machine is shared and noisy.
    raws, raws1, streams = [], [], []
    for _ in range(args.rounds):
        raws.append(raw_scan_rate(args.prepared, args.rows))
        raws1.append(raw_scan_rate(args.prepared, args.rows, group=1))
        streams.append(stream_rate(args.prepared, args.batch, args.workers, args.rows))
    raw, raw1, stream = float(np.median(raws)), float(np.median(raws1)), float(np.median(streams))
    notebook = notebook_rate(root, args.batch, args.notebook_rows)
    print(f"{args.rounds} rounds, median; batch {args.batch}, {args.rows:,} rows per round, "
          f"stream workers {args.workers}")
    print(f"{'reader':<28} {'examples/s':>12} {'stream / it':>12}")
    print(f"{'raw scan, 8 row groups/read':<28} {raw:>12,.0f} {stream / raw:>11.2f}x")
    print(f"{'raw scan, 1 row group/read':<28} {raw1:>12,.0f} {stream / raw1:>11.2f}x")
    print(f"{'data.stream (KJT batches)':<28} {stream:>12,.0f} {1.0:>11.2f}x")
    print(f"{'per-row Dataset, dicts':<28} {notebook:>12,.0f} {stream / notebook:>11.1f}x")
    if args.world:
        # The global order (data/shards.py) costs each rank a decode of nearly every window: how much of a
        # rank's rate is left at N ranks, against the 1/N of the work it has to do.
        print(f"\nrank 0 of N ranks, global batch {args.batch}: its examples/s, and N x that over one rank's")
        print(f"{'ranks':<8} {'examples/s':>12} {'N x rate / 1 rank':>18}")
        print(f"{1:<8} {stream:>12,.0f} {1.0:>17.2f}x")
        for world in args.world:
            rates = [stream_rate(args.prepared, args.batch, args.workers, args.rows // world, world)
                     for _ in range(args.rounds)]
            rate = float(np.median(rates))
            print(f"{world:<8} {rate:>12,.0f} {world * rate / stream:>17.2f}x")


if __name__ == "__main__":
    main()
