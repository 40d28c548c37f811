"""Index benchmark at H&M scale: 105,542 items x 64 dims, 1,371,980 queries, CPU.

IVF (inner product) against exact IndexFlatIP: build time, recall@12 against exact, and queries/s,
side by side in one run. Embeddings are clustered (a mixture of 2,000 directions), like trained ones.

    .venv/bin/python bench/index.py
    .venv/bin/python bench/index.py --queries 200000 --kind ivf_pq

Goal: IVF recall@12 >= 0.95 of exact at >= 5x the exact QPS.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from trainer import index as ix  # noqa: E402


def clustered(n: int, d: int, centers: int, rng: np.random.Generator, spread: float = 0.35) -> np.ndarray:
    c = rng.normal(size=(centers, d)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + spread * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=105_542)
    ap.add_argument("--queries", type=int, default=1_371_980)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--kind", default="ivf_flat")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--exact-sample", type=int, default=20_000, help="queries timed and scored exactly")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    items = clustered(args.items, args.dim, 2000, rng)
    queries = clustered(args.queries, args.dim, 2000, rng)
    sample = queries[: args.exact_sample]

    t0 = time.perf_counter()
    index = ix.build(items, kind=args.kind, use_gpu=False)
    build_s = time.perf_counter() - t0
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(items)
    t0 = time.perf_counter()
    exact = flat.search(sample, 12)[1]
    exact_qps = len(sample) / (time.perf_counter() - t0)

    rows = ix.sweep(index, items, sample, k=12, exact=exact)
    nprobe = ix.choose_nprobe(rows, args.target)
    index.nprobe = nprobe
    t0 = time.perf_counter()
    index.search(queries, 12)  # every query, at the chosen nprobe
    full_qps = len(queries) / (time.perf_counter() - t0)
    chosen = next(r for r in rows if r["nprobe"] == nprobe)

    print(f"{args.items:,} items x {args.dim} dims, {args.kind}, nlist {index.nlist}, built in {build_s:.1f}s "
          f"({faiss.omp_get_max_threads()} threads)")
    print(f"{'nprobe':>7} {'recall@12':>10} {'QPS':>12} {'x exact':>8}")
    for r in rows:
        print(f"{r['nprobe']:>7} {r['recall@12']:>10.4f} {r['qps']:>12,.0f} {r['qps'] / exact_qps:>7.1f}x")
    print(f"{'exact':>7} {1.0:>10.4f} {exact_qps:>12,.0f} {1.0:>7.1f}x   (IndexFlatIP, {len(sample):,} queries)")
    print(f"chosen nprobe {nprobe}: recall@12 {chosen['recall@12']:.4f} of exact; all {len(queries):,} queries at "
          f"{full_qps:,.0f} QPS = {full_qps / exact_qps:.1f}x exact")


if __name__ == "__main__":
    main()
