"""Mined hard negatives (the uniform catalogue samples are drawn by data.stream, per batch).

Each row's hard negatives are sampled from the articles ranked [lo, hi) for its query by exact search
over a snapshot of the item embeddings (refreshed every N steps or each epoch), leaving out the row's
target and its purchase history: the very top is skipped because it holds near-duplicates and
unlabelled positives. Mining is a deterministic function of (seed, step, rank) and the snapshot, which
is checkpointed, so a resumed run draws the same negatives. Everything is batched tensor work on the
training device; no per-row Python.
"""

from __future__ import annotations

import torch

from trainer.search import top_k


class HardNegativeMiner:
    def __init__(self, k: int, lo: int, hi: int, n_items: int, dim: int, device: torch.device | str = "cpu"):
        if not 0 <= lo < hi:
            raise ValueError(f"hard negative rank window [{lo}, {hi}) is empty")
        if hi - lo < k:
            raise ValueError(f"loss.hard_negatives={k} does not fit the rank window [{lo}, {hi})")
        self.k, self.lo, self.hi, self.n_items = k, lo, hi, n_items
        self.embeddings = torch.zeros(n_items, dim, device=device)
        self.ready = False

    def refresh(self, item_embeddings: torch.Tensor) -> None:
        """item_embeddings: (catalog, D) for article_idx 0..catalog-1; row 0 (OOV) is never returned."""
        self.embeddings = item_embeddings.detach().float().to(self.embeddings.device).contiguous()
        self.ready = True

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings, "ready": torch.tensor([int(self.ready)])}

    def load_state_dict(self, state: dict) -> None:
        self.embeddings = state["embeddings"].to(self.embeddings.device)
        self.ready = bool(state["ready"].item())

    @torch.no_grad()
    def mine(self, queries: torch.Tensor, positives: torch.Tensor, hist_lengths: torch.Tensor,
             hist_values: torch.Tensor, seed: int, step: int, rank: int) -> torch.Tensor:
        """(B, k) article indices per query row, on the queries' device. ``hist_*``: the rows' purchase
        histories as lengths (B,) and concatenated values."""
        dev = queries.device
        b = queries.shape[0]
        hi = min(self.hi, self.n_items - 1)
        ranked = top_k(queries.detach(), self.embeddings, hi, exclude_items=[0], device=dev)
        window = ranked[:, self.lo:hi] if self.lo < hi else ranked
        known = (window == positives.to(dev)[:, None]) | (window <= 0)  # the target; OOV and padding
        lengths = hist_lengths.to(dev)
        if int(lengths.numel()) and hist_values.numel():
            rows = torch.repeat_interleave(torch.arange(b, device=dev), lengths)
            n = self.n_items + 1
            history_keys = rows * n + hist_values.to(dev).long()
            window_keys = torch.arange(b, device=dev)[:, None] * n + window
            known |= torch.isin(window_keys, history_keys)
        # Random draws on the CPU: the same negatives whatever the device.
        g = torch.Generator().manual_seed(hash((seed, step, rank, 29)) & 0x7FFFFFFF)
        score = torch.rand(window.shape, generator=g).to(dev).masked_fill(known, -1.0)
        fallback = torch.randint(1, self.n_items, (b, self.k), generator=g).to(dev)
        pick = score.topk(self.k, dim=1)
        chosen = window.gather(1, pick.indices)
        # Rows with fewer than k usable candidates take random catalogue articles for the rest.
        return torch.where(pick.values < 0, fallback, chosen)
