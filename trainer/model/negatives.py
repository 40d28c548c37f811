"""The loss's negatives beyond the batch, as negative sources: components built once, each with its own
schedule and state, that the training loop calls before every step without knowing what they are
(``before_step(StepAt)``): uniform catalogue draws per global batch (``UniformNegatives``, which the stream
calls to add their rows to each batch) and mined hard negatives (``MinedNegatives``: the miner with its
refresh schedule and checkpointed snapshot). A new source is a class with ``name``, ``before_step`` and, if
it has state, ``state_dict``/``load_state_dict``; the builder lists it (trainer/loop/builder.py).

Each row's hard negatives are drawn from a window of ranks [lo, hi) of an exact search over a snapshot
of the item embeddings (refreshed every N steps or each epoch), leaving out the row's target and its
purchase history: the very top is skipped because it holds near-duplicates and unlabelled positives.
Two anchors for the search (``loss.hard_anchor``):

  * ``positive`` (PinSage's hard negatives): the articles ranked [lo, hi) around the row's *target*.
    The neighbour lists of the whole catalogue are computed once per refresh (one catalogue-by-catalogue
    search, split over the ranks), so a step only gathers the target's list: O(batch x draws), whatever
    the catalogue size (H&M's 105k articles: 92 s on one CPU thread per refresh, then 7 ms a step of
    2,048 rows, where the query anchor takes 2.8 s a step).
  * ``query`` (ANCE's): the articles ranked [lo, hi) for the row's *query*: an exact top-``hi`` over the
    whole catalogue for every row of every step, the closer to the model's own mistakes and the
    costlier (on an H100 it took the H&M step from 1.0M to 0.2M examples/s).

Mining is a deterministic function of (seed, step, the row's place in the global batch) and the
snapshot, which is checkpointed (the neighbour lists are recomputed from it), so a resumed run draws
the same negatives, on any device and any number of ranks: the random window positions are drawn on the
CPU for the whole global batch (a few per row, not one per window entry) and each rank keeps its rows.
Everything else is batched tensor work on the training device; no per-row Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from data.shards import shares
from trainer.config import HardAnchor
from trainer.parallel import distributed as D
from trainer.retrieval.search import top_k

ANCHORS = tuple(str(a) for a in HardAnchor)


UNIFORM_SALT = 0x6E6567  # keeps the uniform draws apart from the stream's window permutations


@dataclass(frozen=True)
class StepAt:
    """Where the loop is, before a step: what a component's schedule reads."""

    step: int  # global steps done
    epoch: int
    batch_in_epoch: int
    epoch_start: bool  # the first step of an epoch's run (after a start, a resume or the last epoch's end)
    logging: bool  # the step's loss and stats are logged
    check_stop: Callable[[], None] | None = None  # raises when the ranks agreed to stop (long phases call it)


@dataclass(frozen=True)
class UniformNegatives:
    """The loss's mixed negatives (``loss.mixed_negatives``): ``count`` catalogue articles (1..N-1; 0 is the
    OOV row) drawn uniformly for each global batch from (seed, epoch, global batch). Called by the stream
    (``ExampleStream(extra_rows=...)``) for this rank's share, so the ranks' shares, gathered in rank order
    by the loss, are the one-rank draw: the same negatives at any world size."""

    count: int  # -1: the whole catalogue, every article once (the full softmax)
    n_items: int
    seed: int
    rank: int = 0
    world_size: int = 1
    name = "uniform"  # stateless: a function of (seed, epoch, global batch)

    def __post_init__(self):
        if self.count < -1:
            raise ValueError(f"loss.mixed_negatives={self.count}: expected a count, 0 (none) or -1 (the catalogue)")

    @property
    def catalogue(self) -> bool:
        return self.count == -1

    @property
    def rows(self) -> int:
        """Negatives per global batch."""
        return self.n_items - 1 if self.catalogue else self.count

    def before_step(self, at: StepAt) -> None:
        pass

    def __call__(self, epoch: int, batch: int) -> np.ndarray:
        if self.catalogue:
            ids = np.arange(1, self.n_items, dtype=np.int32)
        else:
            rng = np.random.default_rng([self.seed, UNIFORM_SALT, epoch, batch])
            ids = rng.integers(1, self.n_items, self.count).astype(np.int32)
        split = shares(self.rows, self.world_size)
        lo = sum(split[:self.rank])
        return ids[lo:lo + split[self.rank]]


class HardNegativeMiner:
    def __init__(self, k: int, lo: int, hi: int, n_items: int, dim: int, device: torch.device | str = "cpu",
                 anchor: HardAnchor = HardAnchor.positive):
        if not 0 <= lo < hi:
            raise ValueError(f"hard negative rank window [{lo}, {hi}) is empty")
        if hi - lo < k:
            raise ValueError(f"loss.hard_negatives={k} does not fit the rank window [{lo}, {hi})")
        if anchor not in ANCHORS:
            raise ValueError(f"hard negative anchor {anchor!r} is not one of {ANCHORS}")
        self.k, self.lo, self.hi, self.n_items, self.anchor = k, lo, hi, n_items, anchor
        self.draws = max(4 * k, k + 16)  # window positions drawn per row; the first k usable are kept
        self.embeddings = torch.zeros(n_items, dim, device=device)
        self.neighbours: torch.Tensor | None = None  # (catalog, window) int32, anchor=positive only
        self.ready = False

    def refresh(self, item_embeddings: torch.Tensor) -> None:
        """item_embeddings: (catalog, D) for article_idx 0..catalog-1; row 0 (OOV) is never returned."""
        self.embeddings = item_embeddings.detach().float().to(self.embeddings.device).contiguous()
        self._index()
        self.ready = True

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings, "ready": torch.tensor([int(self.ready)])}

    def load_state_dict(self, state: dict) -> None:
        self.embeddings = state["embeddings"].to(self.embeddings.device)
        self.ready = bool(state["ready"].item())
        if self.ready:
            self._index()

    def _index(self) -> None:
        """The positive anchor's neighbour lists: each rank searches its chunks of the catalogue, all gather
        (a collective: refresh and load run on every rank at once). The chunks are the same at every world
        size, so the lists are too."""
        if self.anchor == HardAnchor.positive:
            hi = min(self.hi, self.n_items - 1)
            dev = self.embeddings.device
            parts = [torch.from_numpy(p) for p in D.dealt_chunks(self.n_items, 4096)]
            lists = [top_k(self.embeddings[p.to(dev)], self.embeddings, hi, exclude_items=[0], device=dev)
                     for p in parts]
            mine = torch.cat(lists)[:, self.lo:hi].to(torch.int32).contiguous()
            self.neighbours = D.gather_in_order(mine, torch.cat(parts).numpy(), self.n_items)

    def _window(self, queries: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """(B, W) candidate article indices per row, -1 where the catalogue is too small."""
        if self.anchor == HardAnchor.positive:
            return self.neighbours[positives].long()
        hi = min(self.hi, self.n_items - 1)
        ranked = top_k(queries.detach(), self.embeddings, hi, exclude_items=[0], device=queries.device)
        return ranked[:, self.lo:hi]

    @torch.no_grad()
    def mine(self, queries: torch.Tensor, positives: torch.Tensor, hist_lengths: torch.Tensor,
             hist_values: torch.Tensor, seed: int, step: int, first_row: int = 0,
             global_rows: int | None = None) -> torch.Tensor:
        """(B, k) article indices per query row, on the queries' device. ``hist_*``: the rows' purchase
        histories as lengths (B,) and concatenated values. The rows are rows ``[first_row, first_row + B)``
        of a global batch of ``global_rows`` (default: B, one rank)."""
        dev = queries.device
        b = queries.shape[0]
        positives = positives.to(dev).long()
        window = self._window(queries, positives)
        # Random window positions on the CPU, for the global batch: the same negatives whatever the device
        # and however many ranks share the batch.
        n = global_rows or b
        g = torch.Generator().manual_seed(hash((seed, step, 29)) & 0x7FFFFFFF)
        at = torch.randint(0, max(window.shape[1], 1), (n, self.draws), generator=g)[first_row:first_row + b].to(dev)
        fallback = torch.randint(1, self.n_items, (n, self.k), generator=g)[first_row:first_row + b].to(dev)
        cand = window.gather(1, at) if window.shape[1] else torch.full_like(at, -1)
        known = (cand == positives[:, None]) | (cand <= 0)  # the target; OOV and padding
        earlier = torch.ones(self.draws, self.draws, dtype=torch.bool, device=dev).tril(-1)
        known |= ((at[:, :, None] == at[:, None, :]) & earlier).any(2)  # a position drawn before
        lengths = hist_lengths.to(dev)
        if int(lengths.numel()) and hist_values.numel():
            rows = torch.repeat_interleave(torch.arange(b, device=dev), lengths)
            n = self.n_items + 1
            history_keys = rows * n + hist_values.to(dev).long()
            known |= torch.isin(torch.arange(b, device=dev)[:, None] * n + cand, history_keys)
        # The first k usable draws of each row, in draw order; rows with fewer take random catalogue articles.
        order = known.long() * self.draws + torch.arange(self.draws, device=dev)
        pick = order.topk(self.k, dim=1, largest=False).indices
        chosen = cand.gather(1, pick)
        return torch.where(known.gather(1, pick), fallback, chosen)


class MinedNegatives:
    """The mined hard negatives as a negative source: the miner (checkpointed as ``miner``) refreshed from the
    item tower on its schedule (``loss.hard_every``). ``embed_items(check_stop)``: the catalogue's item-tower
    vectors; ``pause()``: lets the step runner finish its pending step before the refresh reads the tables."""

    name = "miner"

    def __init__(self, miner: HardNegativeMiner, every: int, embed_items: Callable, pause: Callable[[], None]):
        self.miner, self.every, self.embed_items, self.pause = miner, every, embed_items, pause

    def before_step(self, at: StepAt) -> None:
        if refresh_due(self.every, at.step, at.batch_in_epoch, at.epoch_start):
            self.pause()
            self.miner.refresh(self.embed_items(at.check_stop))

    def state_dict(self) -> dict:
        return self.miner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.miner.load_state_dict(state)


def refresh_due(every: int, step: int, batch_in_epoch: int, epoch_start: bool) -> bool:
    """When the miner's snapshot is refreshed (``loss.hard_every``): at each epoch's start (``every`` 0),
    or every ``every`` steps, counted on the global step (an epoch's end waits for the next start)."""
    if every <= 0:
        return epoch_start and batch_in_epoch == 0
    return step % every == 0 and (epoch_start or batch_in_epoch > 0)
