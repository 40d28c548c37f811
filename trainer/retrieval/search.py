"""Exact inner-product top-k: the one helper every stage uses (validation, export's users, recommend,
evaluation without an index, the hard-negative miner, the index's recall reference).

Scores are computed in chunks of queries on ``device`` (the GPU when there is one), so memory stays
bounded at any catalogue size. Items can be excluded for every query (the OOV row) and per query (a CSR
list, e.g. what the customer already bought): their scores become -inf and they rank last.
"""

from __future__ import annotations

import numpy as np
import torch

from data.jagged import Jagged


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _as_tensor(x, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return t.to(device=device, dtype=torch.float32)


def top_k(queries, items, k: int, exclude_items=None, seen: Jagged | None = None,
          device: torch.device | None = None, chunk: int = 4096) -> torch.Tensor:
    """(queries, k) int64 item rows by descending inner product (on the CPU).

    ``exclude_items``: item rows never returned (ranked last). ``seen``: item rows to exclude, a list
    per query. Rows past the catalogue (k > items) are -1.
    """
    device = device or (queries.device if isinstance(queries, torch.Tensor) else default_device())
    it = _as_tensor(items, device)
    n_items = it.shape[0]
    kk = min(k, n_items)
    n_q = queries.shape[0]
    budget = (1 << 29) if device.type == "cuda" else (1 << 26)  # scores at a time: 2 GB on a GPU, 256 MB else
    chunk = max(1, min(chunk if device.type != "cuda" else max(chunk, 1 << 16), budget // max(n_items, 1)))
    out = torch.full((n_q, k), -1, dtype=torch.int64, device=device)
    excl = None
    if exclude_items is not None and len(exclude_items):
        excl = torch.as_tensor(np.asarray(exclude_items), dtype=torch.int64, device=device)
    for lo in range(0, n_q, chunk):
        hi = min(lo + chunk, n_q)
        q = _as_tensor(queries[lo:hi], device)
        scores = q @ it.T
        if excl is not None:
            scores[:, excl] = -torch.inf
        if seen is not None:
            off, vals = seen.offsets, seen.values
            rows = np.repeat(np.arange(hi - lo), np.diff(off[lo:hi + 1]))
            cols = vals[off[lo]:off[hi]]
            if len(cols):
                scores[torch.as_tensor(rows, device=device), torch.as_tensor(cols, dtype=torch.int64, device=device)] = \
                    -torch.inf
        top = scores.topk(kk, dim=1)
        idx = torch.where(torch.isfinite(top.values), top.indices, torch.full_like(top.indices, -1))
        out[lo:hi, :kk] = idx
    return out


def drop_seen(ranked: np.ndarray, seen: Jagged, k: int) -> np.ndarray:
    """The first k entries of each row of ``ranked`` that are not in the row's list of ``seen``, rank order
    kept: for rankings fetched with a margin from an approximate index."""
    n = ranked.shape[0]
    items = seen.values.astype(np.int64)
    stride = int(max(ranked.max(initial=0), items.max(initial=0))) + 2
    hit = np.isin(np.arange(n, dtype=np.int64)[:, None] * stride + ranked, seen.owners() * stride + items)
    order = np.argsort(hit, axis=1, kind="stable")  # unseen first
    return np.take_along_axis(ranked, order, axis=1)[:, :k]


def seen_lists(customer: np.ndarray, article: np.ndarray, who: np.ndarray) -> Jagged:
    """The distinct articles each customer of ``who`` has in the (customer, article) interaction arrays,
    in the order of ``who``."""
    width = int(article.max(initial=0)) + 1
    pairs = np.unique(customer.astype(np.int64) * width + article.astype(np.int64))
    owner, item = pairs // width, pairs % width
    lo = np.searchsorted(owner, who, side="left")
    hi = np.searchsorted(owner, who, side="right")
    return Jagged(np.r_[0, np.cumsum(hi - lo)].astype(np.int64), item[_ranges(lo, hi)])


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The concatenated index ranges lo[i]..hi[i]-1."""
    lengths = hi - lo
    out = np.r_[0, np.cumsum(lengths)]
    return np.arange(out[-1], dtype=np.int64) - np.repeat(out[:-1], lengths) + np.repeat(lo, lengths)


def list_column(table, column: str = "targets") -> Jagged:
    """A list column of an evaluation table (targets, history), int64."""
    return Jagged.from_arrow(table[column]).astype(np.int64)
