"""CSV reading speed: the project's reader (record boundaries cut with NumPy, then pyarrow per block)
beside pyarrow's own readers, on an H&M-shaped transactions file, in one run.

    .venv/bin/python bench/ingest.py                 # 2M rows (~190 MB), written to a temporary folder
    .venv/bin/python bench/ingest.py --rows 10000000

Rows: ``data.csvparse.stream_csv`` at several block sizes (what ``ingest.batch_bytes`` sets), then
pyarrow's streaming reader (``open_csv``, single-threaded, what the project used before: it neither
counts lines nor handles a quoted newline across blocks) and pyarrow's whole-file multi-threaded
``read_csv`` (the fastest pyarrow can read, with the whole file in memory). Every reader reads all
columns as binary, as the ingest does; the ratio column is rows/s against ``open_csv``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.csvparse import Report, stream_csv  # noqa: E402

COLUMNS = ["t_dat", "customer_id", "article_id", "price", "sales_channel_id"]


def write_file(path: pathlib.Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        f.write(",".join(COLUMNS) + "\n")
        for lo in range(0, rows, 500_000):
            n = min(500_000, rows - lo)
            days = rng.integers(0, 28, n)
            cust = rng.integers(0, 2**63, n, dtype=np.int64)
            art = rng.integers(108775015, 959461001, n)
            price = rng.random(n) / 10
            chan = rng.integers(1, 3, n)
            f.write("".join(f"2020-09-{d + 1:02d},{c:064x},0{a},{p:.16f},{ch}\n"
                            for d, c, a, p, ch in zip(days, cust, art, price, chan)))


def timed(fn) -> tuple[int, float]:
    t0 = time.perf_counter()
    rows = fn()
    return rows, time.perf_counter() - t0


def project(path: str, block: int) -> int:
    report = Report(path)
    return sum(batch.num_rows for batch, _ in stream_csv(path, COLUMNS, report, block_size=block))


def arrow_streaming(path: str, block: int) -> int:
    reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=block, use_threads=False),
                           convert_options=pcsv.ConvertOptions(column_types={c: pa.binary() for c in COLUMNS}))
    return sum(batch.num_rows for batch in reader)


def arrow_whole(path: str) -> int:
    return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(
        column_types={c: pa.binary() for c in COLUMNS})).num_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "transactions_train.csv"
        write_file(path, args.rows)
        mb = path.stat().st_size / 1e6
        print(f"{args.rows:,} rows, {mb:.0f} MB")
        results = [("pyarrow open_csv (streaming), 16 MiB blocks", *timed(lambda: arrow_streaming(str(path), 16 << 20)))]
        for block in (4, 16, 64):
            results.append((f"project stream_csv, {block} MiB blocks", *timed(lambda b=block: project(str(path), b << 20))))
        results.append(("pyarrow read_csv (whole file, threads)", *timed(lambda: arrow_whole(str(path)))))
        base = results[0][1] / results[0][2]
        print("| reader | rows | seconds | MB/s | rows/s | vs open_csv |\n|---|---:|---:|---:|---:|---:|")
        for name, rows, secs in results:
            assert rows == args.rows, (name, rows)
            print(f"| {name} | {rows:,} | {secs:.2f} | {mb / secs:.0f} | {rows / secs:,.0f} | {rows / secs / base:.2f}x |")


if __name__ == "__main__":
    main()
