"""FAISS IVF index over item embeddings (inner product), built on GPU when possible, saved for CPU:
the library the index stage (trainer/index.py), the Retriever and the benchmarks use.

    index = build(embeddings, kind="ivf_flat")          # nlist from catalogue size unless given
    report = sweep(index, embeddings, queries, k=12)    # recall@k against exact search, QPS
    index.nprobe = choose_nprobe(report, target=0.95)
    searcher = for_search(index, nprobe)                # on the GPU when there is one

The index stores row positions 0..N-1; ``save`` writes the article-id map beside it, and the report
names the export (so the train run, step and fingerprint) it was built from.
"""

from __future__ import annotations

import hashlib

import functools
import logging
import math
import time

import faiss
import numpy as np
import pyarrow as pa

from data.io import fs_and_path, join, read_json, read_table, write_json, write_parquet
from data.staging import output_of, staged
from trainer.retrieval.search import top_k

log = logging.getLogger(__name__)


def default_nlist(n: int) -> int:
    """~8·sqrt(N) lists (inside FAISS's 4..16·sqrt(N) advice; finer lists measured better than 4·sqrt(N)
    in bench/index.py: recall 0.954 vs 0.757 at the same 0.6% of the catalogue scanned), and never so
    many that fewer than 39 training points per list remain."""
    return int(max(1, min(8 * math.sqrt(n), n // 39)))


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@functools.lru_cache(maxsize=1)
def gpu_resources():
    """One set of FAISS GPU resources (scratch memory, streams) per process."""
    return faiss.StandardGpuResources()


def build(embeddings: np.ndarray, kind: str = "ivf_flat", nlist: int | None = None, pq_m: int = 16,
          pq_bits: int = 8, train_size: int | None = None, use_gpu: bool | None = None, seed: int = 0) -> faiss.Index:
    """Trains and fills an IVF index; returns a CPU index (moved back when built on GPU)."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = x.shape
    nlist = nlist or default_nlist(n)
    quantizer = faiss.IndexFlatIP(d)
    if kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf_pq":
        if d % pq_m:
            raise ValueError(f"index.pq_m={pq_m} must divide the embedding dimension {d}")
        index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, pq_bits, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"index.kind={kind!r}: expected ivf_flat or ivf_pq")
    need = 39 * nlist
    size = min(n, max(need, train_size or 256 * nlist))  # FAISS uses at most 256 points per list
    if size < need:
        raise ValueError(f"{n} items cannot train {nlist} lists (FAISS needs >= 39 x nlist = {need}); lower index.nlist")
    sample = x[np.random.default_rng(seed).choice(n, size, replace=False)] if size < n else x
    on_gpu = gpu_available() if use_gpu is None else use_gpu
    if on_gpu:
        gpu = faiss.index_cpu_to_gpu(gpu_resources(), 0, index)
        gpu.train(sample)
        gpu.add(x)
        index = faiss.index_gpu_to_cpu(gpu)
    else:
        index.train(sample)
        index.add(x)
    log.info("built %s nlist=%d on %s from %d training points, %d items", kind, nlist,
             "GPU" if on_gpu else "CPU", size, n)
    return index


def exact_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return top_k(queries, embeddings, k).cpu().numpy()


def for_search(index: faiss.Index, nprobe: int, use_gpu: bool | None = None) -> faiss.Index:
    """The index ready to search at ``nprobe``: a GPU copy when faiss has GPU support and a GPU is
    present (same lists and vectors, so the same results up to float ties), else the index itself."""
    on_gpu = gpu_available() if use_gpu is None else use_gpu
    searcher = faiss.index_cpu_to_gpu(gpu_resources(), 0, index) if on_gpu else index
    set_nprobe(searcher, nprobe)
    return searcher


def check_matches(index_dir: str, fingerprint_id: str, step: int) -> None:
    """Refuses an index built from another run (or another step) than the model it serves."""
    built_from = read_json(join(output_of(index_dir), "index_report.json")).get("export", {})
    if (built_from.get("fingerprint"), built_from.get("step")) != (fingerprint_id, step):
        raise RuntimeError(f"{index_dir} was built from run fingerprint {built_from.get('fingerprint')} step "
                           f"{built_from.get('step')}, but the model is {fingerprint_id} step {step}; rebuild the "
                           "index (trainer.export, then trainer.index) or set index_dir=null")


def recall_vs_exact(approx: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top-k found by the approximate top-k (per query, averaged)."""
    n, k = exact.shape
    width = int(max(approx.max(initial=0), exact.max(initial=0))) + 2
    rows = np.arange(n, dtype=np.int64)[:, None] * width
    return float(np.isin(approx + rows, exact + rows).sum() / exact.size)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """On a CPU or a GPU IVF index."""
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = int(nprobe)
    else:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))


def sweep(index: faiss.Index, embeddings: np.ndarray, queries: np.ndarray, k: int = 12,
          nprobes=(1, 2, 4, 8, 16, 32, 64, 128), exact: np.ndarray | None = None, use_gpu: bool = False) -> list[dict]:
    """recall@k against exact inner-product search and queries/s for each nprobe (searched on the GPU
    with ``use_gpu``)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if exact is None:
        exact = exact_top_k(embeddings, q, k)
    nlist = index.nlist
    searcher = for_search(index, 1, use_gpu)
    rows = []
    for p in nprobes:
        if p > nlist:
            break
        set_nprobe(searcher, p)
        t0 = time.perf_counter()
        approx = searcher.search(q, k)[1]
        dt = time.perf_counter() - t0
        rows.append({"nprobe": p, f"recall@{k}": recall_vs_exact(approx, exact), "qps": len(q) / dt})
    return rows


def choose_nprobe(rows: list[dict], target: float, k: int = 12) -> int:
    """The smallest nprobe whose recall meets the target (else the best one measured)."""
    for r in rows:
        if r[f"recall@{k}"] >= target:
            return r["nprobe"]
    return max(rows, key=lambda r: r[f"recall@{k}"])["nprobe"]


def save(index: faiss.Index, article_ids: np.ndarray, run_dir: str, report: dict) -> None:
    """``index.faiss`` (CPU), ``index_ids.parquet`` (row -> article_id) and ``index_report.json`` (the
    commit mark), published together under ``<run_dir>/output``."""
    data = faiss.serialize_index(index).tobytes()
    report = {**report, "digest": hashlib.sha256(data).hexdigest()[:16]}  # what evaluate and the bundle name
    with staged(output_of(run_dir), "index_report.json") as out:
        fs, path = fs_and_path(join(out, "index.faiss"))
        with fs.open(path, "wb") as f:
            f.write(data)
        write_parquet(pa.table({"row": pa.array(np.arange(len(article_ids)), pa.int64()),
                                "article_id": pa.array(article_ids, pa.int64())}), join(out, "index_ids.parquet"))
        write_json(report, join(out, "index_report.json"))


def file_digest(path: str) -> str:
    """The digest of an index file as the index stage records it (``index_report.json`` ``digest``)."""
    fs, p = fs_and_path(path)
    with fs.open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def exists(run_dir: str) -> bool:
    """Whether the index stage published an index in ``run_dir``."""
    fs, path = fs_and_path(join(output_of(run_dir), "index.faiss"))
    return fs.exists(path)


def load(run_dir: str) -> tuple[faiss.Index, np.ndarray]:
    out = output_of(run_dir)
    fs, path = fs_and_path(join(out, "index.faiss"))
    if not fs.exists(path):
        raise FileNotFoundError(f"{join(out, 'index.faiss')}: no index; run trainer.index first")
    with fs.open(path, "rb") as f:
        index = faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))
    ids = read_table(join(out, "index_ids.parquet"))["article_id"].to_numpy()
    return index, ids


def read_embeddings(url: str, id_column: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, (N, D) float32) from an export Parquet file (fixed-size list column ``embedding``)."""
    t = read_table(url)
    emb = t["embedding"].combine_chunks()
    d = emb.type.list_size
    return t[id_column].to_numpy(), emb.values.to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32)
