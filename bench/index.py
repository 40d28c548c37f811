"""Index benchmark at H&M scale: 105,542 items x 64 dims, 1,371,980 queries, CPU.

IVF (inner product) against exact IndexFlatIP: build time, recall@12 against exact, and queries/s,
side by side in one run.

Synthetic embeddings mimic a trained two-tower space: items sit around 2,000 sub-styles that group into
24 styles; a customer blends one to three sub-styles (taste) plus noise. ``--queries independent``
draws queries around unrelated directions instead, the worst case for any IVF index (a customer whose
taste matches no item cluster). ``--embeddings DIR`` uses a real export run directory
(its output/items.parquet, output/users_*.parquet).

    .venv/bin/python bench/index.py
    .venv/bin/python bench/index.py --queries-from independent
    .venv/bin/python bench/index.py --embeddings runs/small/export
    python bench/index.py --gpu      # also build and search on the GPU, beside the CPU, in the same run

Goals: IVF recall@12 >= 0.95 of exact at >= 5x the exact QPS; on a GPU, all 1.37M queries in seconds.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from trainer.retrieval import ivf as ix  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def noise(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    return rng.normal(size=(n, d)).astype(np.float32)


def synthetic(items: int, queries: int, d: int, queries_from: str, rng: np.random.Generator):
    styles = noise(24, d, rng)
    sub = styles[rng.integers(0, 24, 2000)] + 0.8 * noise(2000, d, rng)
    x = unit(sub[rng.integers(0, 2000, items)] + 0.35 * noise(items, d, rng))
    if queries_from == "independent":  # centres unrelated to the items'
        other = noise(2000, d, rng)
        return x, unit(other[rng.integers(0, 2000, queries)] + 0.35 * noise(queries, d, rng))
    q = np.zeros((queries, d), np.float32)
    blend = rng.integers(1, 4, queries)  # each customer likes one to three sub-styles
    for j in range(3):
        w = rng.random(queries).astype(np.float32) * (blend > j)
        q += w[:, None] * sub[rng.integers(0, 2000, queries)]
    return x, unit(q / np.linalg.norm(q, axis=1, keepdims=True) * np.linalg.norm(sub, axis=1).mean()
                   + 0.5 * noise(queries, d, rng))


def exported(directory: str) -> tuple[np.ndarray, np.ndarray]:
    root = pathlib.Path(directory) / "output"  # what trainer.export published
    items = pq.read_table(root / "items.parquet", columns=["embedding"]).column(0).combine_chunks()
    users = pa.concat_tables([pq.read_table(p, columns=["embedding"]) for p in sorted(root.glob("users_*.parquet"))])
    as_matrix = lambda col, d: col.flatten().to_numpy().reshape(-1, d).astype(np.float32)  # noqa: E731
    d = items.type.list_size
    return as_matrix(items, d), as_matrix(users.column(0).combine_chunks(), d)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=105_542)
    ap.add_argument("--queries", type=int, default=1_371_980)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--kind", default="ivf_flat")
    ap.add_argument("--queries-from", choices=["blend", "independent"], default="blend")
    ap.add_argument("--embeddings", help="an export directory to use instead of synthetic embeddings")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--exact-sample", type=int, default=20_000, help="queries timed and scored exactly")
    ap.add_argument("--gpu", action="store_true", help="also build and search on the GPU (faiss-gpu)")
    args = ap.parse_args()
    if args.gpu and not ix.gpu_available():
        sys.exit("--gpu: faiss has no GPU support here, or no GPU is present")
    rng = np.random.default_rng(0)
    if args.embeddings:
        items, queries = exported(args.embeddings)
        args.items, args.dim = items.shape
    else:
        items, queries = synthetic(args.items, args.queries, args.dim, args.queries_from, rng)
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

    source = args.embeddings or f"synthetic, queries from {args.queries_from}"
    print(f"{args.items:,} items x {args.dim} dims ({source}), {args.kind}, nlist {index.nlist}, built in {build_s:.1f}s "
          f"({faiss.omp_get_max_threads()} threads)")
    print(f"{'nprobe':>7} {'recall@12':>10} {'QPS':>12} {'x exact':>8}")
    for r in rows:
        print(f"{r['nprobe']:>7} {r['recall@12']:>10.4f} {r['qps']:>12,.0f} {r['qps'] / exact_qps:>7.1f}x")
    print(f"{'exact':>7} {1.0:>10.4f} {exact_qps:>12,.0f} {1.0:>7.1f}x   (IndexFlatIP, {len(sample):,} queries)")
    print(f"chosen nprobe {nprobe}: recall@12 {chosen['recall@12']:.4f} of exact; all {len(queries):,} queries at "
          f"{full_qps:,.0f} QPS = {full_qps / exact_qps:.1f}x exact")
    if args.gpu:
        gpu_side(args, items, queries, sample, exact, build_s, full_qps, nprobe)


def gpu_side(args, items, queries, sample, exact, cpu_build_s, cpu_full_qps, nprobe) -> None:
    """The same index built and searched on the GPU, and exact search there, beside the CPU numbers."""
    import torch

    from trainer.retrieval.search import top_k

    t0 = time.perf_counter()
    index = ix.build(items, kind=args.kind, use_gpu=True)
    build_s = time.perf_counter() - t0
    top_k(sample[:100], items, 12, device=torch.device("cuda"))  # warm-up
    t0 = time.perf_counter()
    gpu_exact = top_k(sample, items, 12, device=torch.device("cuda")).cpu().numpy()
    torch.cuda.synchronize()
    exact_qps = len(sample) / (time.perf_counter() - t0)
    rows = ix.sweep(index, items, sample, k=12, exact=exact, use_gpu=True)
    searcher = ix.for_search(index, nprobe, use_gpu=True)
    t0 = time.perf_counter()
    searcher.search(queries, 12)
    full_s = time.perf_counter() - t0
    chosen = next(r for r in rows if r["nprobe"] == nprobe)
    print(f"GPU: built in {build_s:.2f}s ({cpu_build_s / build_s:.1f}x the CPU); exact top-12 {exact_qps:,.0f} QPS "
          f"(agrees with the CPU's on {ix.recall_vs_exact(gpu_exact, exact):.4f})")
    print(f"{'nprobe':>7} {'recall@12':>10} {'GPU QPS':>12}")
    for r in rows:
        print(f"{r['nprobe']:>7} {r['recall@12']:>10.4f} {r['qps']:>12,.0f}")
    print(f"GPU, nprobe {nprobe}: recall@12 {chosen['recall@12']:.4f}; all {len(queries):,} queries in {full_s:.2f}s = "
          f"{len(queries) / full_s:,.0f} QPS ({len(queries) / full_s / cpu_full_qps:.1f}x the CPU)")


if __name__ == "__main__":
    main()
