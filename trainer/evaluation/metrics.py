"""Ranking metrics over whole arrays: Recall@K, NDCG@K, MAP@K (H&M's MAP@12), MRR, HitRate@K, coverage.

Inputs: ``ranked`` (queries, K) item ids in rank order (-1 pads a short list) and the ground truth, a
list of relevant items per query (data/jagged.py). Relevance is binary. A repeated id in a ranked list
counts once (as in the competition's ``apk``). Queries with empty ground truth are skipped (and
counted) since every metric here divides by the number of relevant items.
"""

from __future__ import annotations

import numpy as np

from data.jagged import Jagged


def hits_matrix(ranked: np.ndarray, truth: Jagged) -> np.ndarray:
    """(queries, K) bool: whether ranked[q, k] is relevant for q (first occurrence of an id only)."""
    n, k = ranked.shape
    rows, items = truth.owners(), truth.values
    width = int(max(ranked.max(initial=0), items.max(initial=0))) + 2
    relevant = np.unique(rows * width + items.astype(np.int64))
    keys = np.arange(n, dtype=np.int64)[:, None] * width + ranked.astype(np.int64)
    hit = np.isin(keys, relevant) & (ranked >= 0)
    # Count an id once per row: later duplicates are not hits.
    order = np.argsort(ranked, axis=1, kind="stable")
    s = np.take_along_axis(ranked, order, axis=1)
    dup_sorted = np.zeros_like(hit)
    dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
    dup = np.zeros_like(hit)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    return hit & ~dup


def evaluate(ranked: np.ndarray, truth: Jagged, ks=(12,), catalog_size: int | None = None, map_k: int = 12) -> dict:
    n_rel = truth.lengths()
    keep = n_rel > 0
    ranked, n_rel = ranked[keep], n_rel[keep]
    hit = hits_matrix(ranked, truth.take(np.flatnonzero(keep)))
    out: dict = {"queries": int(keep.sum()), "skipped_empty_truth": int((~keep).sum())}
    if not keep.any():
        return out
    discounts = 1.0 / np.log2(np.arange(2, ranked.shape[1] + 2))
    for k in ks:
        h = hit[:, :k]
        out[f"recall@{k}"] = float(np.mean(h.sum(1) / n_rel))
        out[f"hitrate@{k}"] = float(np.mean(h.any(1)))
        dcg = (h * discounts[:k]).sum(1)
        ideal = np.cumsum(discounts[:k])[np.minimum(n_rel, k) - 1]
        out[f"ndcg@{k}"] = float(np.mean(dcg / ideal))
    h = hit[:, :map_k]
    precision_at = np.cumsum(h, axis=1) / np.arange(1, h.shape[1] + 1)
    out[f"map@{map_k}"] = float(np.mean((precision_at * h).sum(1) / np.minimum(n_rel, map_k)))
    first = np.where(hit.any(1), hit.argmax(1) + 1, np.inf)
    out["mrr"] = float(np.mean(1.0 / first))
    if catalog_size:
        recommended = np.unique(ranked[ranked >= 0])
        out["coverage"] = float(len(recommended) / catalog_size)
    return out


def recall_curve(ranked: np.ndarray, truth: Jagged) -> np.ndarray:
    """Recall@K for K = 1..ranked.shape[1] (queries with empty ground truth skipped)."""
    n_rel = truth.lengths()
    keep = n_rel > 0
    if not keep.any():
        return np.zeros(ranked.shape[1])
    hit = hits_matrix(ranked[keep], truth.take(np.flatnonzero(keep)))
    return np.mean(np.cumsum(hit, axis=1) / n_rel[keep][:, None], axis=0)


