"""The one ranking, from validation to the served answer: the top k articles for query vectors. The
Retriever (validation, evaluate, recommend: trainer/retrieval/retriever.py) and the serving bundle
(trainer/serving/bundle.py) both rank through :class:`Ranker`; nothing else ranks the catalogue for the
model. numpy, torch and the project's search helpers only (the serving side imports no training code).

A ranking is:
  1. the inner product of the query and item vectors (the recent-sales bonus is one column of each,
     trainer/model/sales.py), searched exactly (trainer/retrieval/search.py) or through an index (a FAISS
     IVF index at its chosen nprobe);
  2. articles the customer bought left out (``seen``): exactly in exact search; through an index, from a
     fetch of as many more candidates as the longest bought list of the chunk, so k always remain;
  3. without that exclusion, the customer's own last articles scored with the buying-again term
     (trainer/model/repeats.py: a bonus per position, or the mixture with a per-customer level) and the best
     k kept; the inner product fetches k + positions candidates so that the answer is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from data.jagged import Jagged
from trainer.retrieval.rerank import boost_recent
from trainer.retrieval.search import drop_seen, top_k

CHUNK = 4096  # queries ranked at a time through an index: bounds the candidates fetched


@dataclass
class Queries:
    """What a ranking reads of its queries: the scoring vectors and, with the buying-again mixture, each
    query's level (trainer/model/repeats.py)."""

    vectors: np.ndarray | torch.Tensor  # (n, D)
    levels: np.ndarray | None = None  # (n,)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def numpy(self) -> np.ndarray:
        v = self.vectors
        return v.float().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, np.float32)

    def take(self, lo: int, hi: int) -> "Queries":
        return Queries(self.vectors[lo:hi], None if self.levels is None else self.levels[lo:hi])


@dataclass
class BuyingAgain:
    """The learned buying-again term: a score per history position (newest first) and, for the mixture,
    the temperature its per-customer level mixes at (None: the bonus is added to the score)."""

    bonus: np.ndarray
    temperature: float | None


# An index search: (queries (n, D) float32, width) -> (n, width) article rows, -1 for none.
Search = Callable[[np.ndarray, int], np.ndarray]


class Ranker:
    def __init__(self, items: torch.Tensor | np.ndarray, buying_again: BuyingAgain | None = None,
                 search: Search | None = None, exclude: np.ndarray | None = None,
                 device: torch.device | None = None):
        """``items``: (rows, D) scoring vectors by article row (row 0: the OOV bucket, never returned;
        ``exclude``: further rows never returned). ``search``: an index over the rows (None: exact)."""
        self.items = torch.as_tensor(items)
        self.buying_again = buying_again if buying_again is not None and len(buying_again.bonus) else None
        self.search, self.device = search, device
        self.exclude = np.union1d([0], exclude if exclude is not None else []).astype(np.int64)
        self._items_np: np.ndarray | None = None

    def buys_again(self, seen) -> bool:
        """Whether rankings without ``seen`` carry the buying-again term (never when bought articles are
        left out: nothing bought can come back)."""
        return self.buying_again is not None and seen is None

    def items_np(self) -> np.ndarray:
        if self._items_np is None:
            self._items_np = self.items.float().cpu().numpy()
        return self._items_np

    def top_k(self, queries: Queries, k: int, seen: Jagged | None = None, recent: Jagged | None = None) -> np.ndarray:
        """(n, k) article rows, best first (-1 past the catalogue). ``seen``: each query's articles to leave
        out; ``recent``: each query's history, oldest first (the buying-again term reads its newest
        positions; ignored with ``seen``)."""
        extra = len(self.buying_again.bonus) if self.buys_again(seen) and recent is not None else 0
        width = k + extra
        if self.search is not None:
            parts = []
            for lo in range(0, len(queries), CHUNK):
                hi = min(lo + CHUNK, len(queries))
                part_seen = seen.slice(lo, hi) if seen is not None else None
                margin = int(part_seen.lengths().max(initial=0)) if part_seen is not None else 0
                found = self.search(np.ascontiguousarray(queries.take(lo, hi).numpy(), np.float32), width + margin)
                parts.append(drop_seen(found, part_seen, width) if part_seen is not None else found[:, :width])
            ranked = np.concatenate(parts) if parts else np.zeros((0, width), np.int64)
        else:
            ranked = top_k(queries.vectors, self.items, width, exclude_items=self.exclude, seen=seen,
                           device=self.device).cpu().numpy()
        if extra:
            again = self.buying_again
            ranked = boost_recent(ranked, queries.numpy(), self.items_np(), recent, again.bonus, k,
                                  None if again.temperature is None else queries.levels, again.temperature)
        return ranked[:, :k]
