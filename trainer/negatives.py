"""Mined hard negatives (the uniform catalogue samples are drawn by data.stream, per batch).

Mining is a deterministic function of (seed, step, rank) and the checkpointed index, so a resumed run
draws the same negatives.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch


class HardNegativeMiner:
    """Nearest articles to each query in an exact inner-product FAISS index of item embeddings,
    excluding the row's known positives (its target and its purchase history), sampled from the rank
    window [lo, hi) so that near-duplicates and unlabelled positives at the very top are skipped."""

    def __init__(self, k: int, lo: int, hi: int):
        if not 0 <= lo < hi:
            raise ValueError(f"hard negative rank window [{lo}, {hi}) is empty")
        self.k, self.lo, self.hi = k, lo, hi
        self.index: faiss.Index | None = None
        self.embeddings: torch.Tensor | None = None  # kept for checkpoints: the index is rebuilt from it

    def refresh(self, item_embeddings: torch.Tensor) -> None:
        """item_embeddings: (catalog, D) for article_idx 0..catalog-1; row 0 (OOV) is never returned."""
        self.embeddings = item_embeddings.detach().float().cpu().contiguous()
        emb = self.embeddings.numpy().copy()
        emb[0] = 0.0
        self.index = faiss.IndexFlatIP(emb.shape[1])
        self.index.add(emb)

    @property
    def ready(self) -> bool:
        return self.index is not None

    def mine(self, queries: torch.Tensor, positives: torch.Tensor, history: list[torch.Tensor] | None,
             seed: int, step: int, rank: int) -> torch.Tensor:
        """(B, k) article indices per query row."""
        q = queries.detach().float().cpu().numpy()
        hi = min(self.hi, self.index.ntotal - 1)
        _, ids = self.index.search(q, hi)
        ids = torch.from_numpy(ids)
        window = ids[:, self.lo:hi] if self.lo < hi else ids
        known = window == positives.cpu()[:, None]
        known |= window <= 0  # OOV row and FAISS's -1 padding
        if history is not None:
            for b, h in enumerate(history):  # B rows x <= history_len items: small
                if len(h):
                    known[b] |= torch.isin(window[b], h.cpu())
        g = torch.Generator().manual_seed(hash((seed, step, rank, 29)) & 0x7FFFFFFF)
        score = torch.rand(window.shape, generator=g).masked_fill(known, -1.0)
        pick = score.topk(self.k, dim=1).indices
        chosen = window.gather(1, pick)
        # Rows with fewer than k usable candidates fall back to a random catalogue article.
        short = score.gather(1, pick) < 0
        if short.any():
            chosen[short] = torch.randint(1, self.index.ntotal, (int(short.sum()),), generator=g)
        return chosen
