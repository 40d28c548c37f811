"""Buying again: the articles of the customer's last N purchases, scored apart from the towers.

Customers re-buy (a colour they liked, a basic): in H&M's data, and in the synthetic generator, a
share of purchases repeats one of the customer's recent articles. An inner product cannot put a
customer's own few articles on top, so the model learns how likely each of them is to come back, by
its position in the history (newest first, ``model.repeat_positions``). ``model.repeat_mode``:

``mixture`` (default): the probability of a recent article is the towers' plus a buying-again mass, as
explore/repeat recommenders (RepeatNet) model it. In the towers' logit units (score over temperature T):

    logit(query, article) = logaddexp(<query, article> / T, (bias[p] + level(query)) / T)
                            if the article is the query's p-th newest, else <query, article> / T

``level(query) = head(query) + <query, mean article>``: ``head`` is a small MLP of the query vector
(``RepeatTerm.level``; it reads the vector, it does not train it), because the mass must be set against
how peaked the query's own softmax over the catalogue is, which a constant cannot do. The second term
ties the level to the query's scores: without it, training can lower the buying-again mass by raising
every score alike, and the towers collapse onto one direction (seen on ``small``: in-batch accuracy
0.01 instead of 0.03 after 250 steps). Training takes the mean article from the batch's uniform
negatives (``loss.mixed_negatives``), scoring from the whole catalogue. Under the sampled softmax the
mixed logit takes the candidate's logQ correction like any other (``shift``). On the synthetic
``small`` data (validation week) MAP@12 0.1881 with ``bonus`` -> 0.1924 (0.1890 -> 0.1919 with another
seed).

``bonus``: a bonus per position added to the score, ``<query, article> + bias[p]``.

Training applies it to every candidate's logit: in-batch, cross-rank, uniform and mined. Scoring
(validation, evaluate, recommend) retrieves ``k + N`` articles by the inner product (exact or through
FAISS), scores the customer's last N articles themselves, and keeps the best k: exact, because the
other articles keep their inner product and at most N of its top ``k + N`` are history articles.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def logit_bonus(recent: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """bias[p] where the candidate is the row's p-th newest article (the newest position when bought
    more than once), else 0. ``ids``: (C,) candidates shared by all rows, or (B, H) per row."""
    return add_bonus(torch.zeros(recent.shape[0], ids.shape[-1], dtype=bias.dtype, device=ids.device),
                     recent, ids, bias)


def add_bonus(logits: torch.Tensor, recent: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``logits`` (B, C) plus :func:`logit_bonus`. Shared candidates on the CPU take the sparse join (a
    few history entries per row against the sorted ids, added in place: no second B x C matrix);
    elsewhere the dense comparison (no host sync on a GPU)."""
    if ids.dim() == 1 and ids.device.type == "cpu":
        rows, cols, pos = _matches(recent, ids)
        return logits.index_put_((rows, cols), bias[pos].to(logits.dtype), accumulate=True)
    return logits + _dense_bonus(recent, ids, bias)


def mix_recent(logits: torch.Tensor, recent: torch.Tensor, ids: torch.Tensor, level: torch.Tensor,
               shift: torch.Tensor | None = None) -> torch.Tensor:
    """``logits`` (B, C) where the candidate is the row's p-th newest article (the newest position when
    bought more than once) become ``logaddexp(logit, level[row, p] + shift[candidate])``: the towers'
    probability plus a buying-again mass. ``shift``: (C,) the candidates' logQ correction, or None."""
    if ids.dim() == 1 and ids.device.type == "cpu":
        rows, cols, pos = _matches(recent, ids)
        lv = level[rows, pos] + (shift[cols] if shift is not None else 0)
        return logits.index_put((rows, cols), torch.logaddexp(logits[rows, cols], lv.to(logits.dtype)))
    # elsewhere (no host sync on a GPU): the position of each candidate, then one mixed B x C pass
    ids2 = ids[None, :] if ids.dim() == 1 else ids
    small = torch.int8 if recent.shape[1] < 128 else torch.int16  # narrow: the passes move few bytes
    pos = torch.full(logits.shape, -1, dtype=small, device=logits.device)
    for p in reversed(range(recent.shape[1])):  # oldest first: a newer copy overwrites
        pos = torch.where((recent[:, p:p + 1] == ids2) & (recent[:, p:p + 1] > 0), p, pos)
    lv = torch.gather(level, 1, pos.clamp(min=0).long()) + (shift[None, :] if shift is not None else 0)
    return torch.where(pos >= 0, torch.logaddexp(logits, lv.to(logits.dtype)), logits)


def _dense_bonus(recent: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    ids = ids[None, :] if ids.dim() == 1 else ids
    out = torch.zeros(recent.shape[0], ids.shape[1], dtype=bias.dtype, device=ids.device)
    for p in reversed(range(recent.shape[1])):  # oldest first: a newer copy overwrites
        hit = (recent[:, p:p + 1] == ids) & (recent[:, p:p + 1] > 0)
        out = torch.where(hit, bias[p], out)
    return out


def _matches(recent: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, candidate column, history position) of every candidate that is one of the row's distinct
    recent articles: the history entries looked up in the sorted candidate ids."""
    r = recent.shape[1]
    older_copy = ((recent[:, :, None] == recent[:, None, :])
                  & torch.ones(r, r, dtype=torch.bool, device=recent.device).tril(-1)).any(2)
    rows, pos = ((recent > 0) & ~older_copy).nonzero(as_tuple=True)
    article = recent[rows, pos]
    sorted_ids, order = torch.sort(ids)
    lo = torch.searchsorted(sorted_ids, article)
    n = torch.searchsorted(sorted_ids, article, right=True) - lo  # candidate columns holding it
    first = torch.cumsum(n, 0) - n
    k = torch.arange(int(n.sum()), device=ids.device) - torch.repeat_interleave(first - lo, n)
    return torch.repeat_interleave(rows, n), order[k], torch.repeat_interleave(pos, n)


class RepeatTerm(nn.Module):
    """The model's buying-again term: a learned bonus per history position, newest first (``bias``), and
    with the mixture the per-query level's head (``level``)."""

    def __init__(self, positions: int, query_dim: int, mixture: bool):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(positions))
        # Linear, ReLU, Linear: the head reads the query vector (detached in the loss)
        self.level = nn.Sequential(nn.Linear(query_dim, 64), nn.ReLU(), nn.Linear(64, 1)) if mixture else None

    @property
    def mixture(self) -> bool:
        return self.level is not None

    def loss_term(self, inp, q: torch.Tensor, mean_score, scale: float):
        """The loss's term ``(logits, ids, shift) -> logits`` for the rows of ``inp`` (their recent articles
        from the model input), in logit units (``scale``: one over the temperature). ``mean_score()``: (B,)
        each query's mean score over the catalogue, the mixture's reference."""
        recent = inp.recent(self.bias.numel())
        if self.level is not None:
            # the level reads the query vector, it does not train it; and moves with the query's scores,
            # so raising every score alike cannot lower the buying-again mass
            level = (self.bias[None, :] + self.level(q.detach()) + mean_score()[:, None]) * scale
            return lambda logits, ids, shift: mix_recent(logits, recent, ids, level, shift)
        bias = self.bias * scale
        return lambda logits, ids, shift: add_bonus(logits, recent, ids, bias)

    def bonus(self) -> np.ndarray:
        """The learned bonus per position, newest first, for scoring."""
        return self.bias.detach().float().cpu().numpy()

    @torch.no_grad()
    def scoring_level(self, q: torch.Tensor, mean_item: torch.Tensor) -> np.ndarray:
        """(n,) each query's level in score units: the head of its vector plus its score against the
        catalogue's mean article (scoring's counterpart of the loss's ``mean_score``)."""
        return (self.level(q)[:, 0] + q @ mean_item).cpu().numpy()
