"""Sampled softmax over in-batch, cross-rank, uniform and mined hard negatives.

For query row b with positive article p_b, the candidates are
  * the positives of every row on every rank (in-batch, cross-rank when a process group is given:
    the global batch, in rank order; every rank's loss sends gradient to every gathered row, summed
    over the ranks, so N ranks compute the gradient one process would over the global batch),
  * ``M`` uniform catalogue articles shared by all rows (mixed negatives; the caller gathers each
    rank's share of the global batch's draws),
  * ``H`` hard negatives of its own (mined, see trainer/model/negatives.py).
Logits are dot products over ``temperature``. ``loss.kind=ccl`` instead takes SimpleX's cosine contrastive
loss (Mao et al. 2021): ``(1 - s+) + w * mean_j max(0, s_j - margin)`` with ``s`` the cosine plus the
scoring terms, over the uniform and mined negatives (the other rows' positives too with
``loss.ccl_in_batch``), no logQ correction, masked candidates left out of the mean.
With logQ correction each shared candidate's logit is reduced by the log of its expected count in the
candidate set: ``log(N_batch * q_j)`` for in-batch
candidates sampled by popularity ``q_j``, ``log(M / catalogue)`` for uniform ones (Yi et al. 2019;
Yang et al. 2020). With accidental-hit masking, a candidate whose article equals the row's positive
(other than the positive itself) is removed from the softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.config import LogQMode
from trainer.parallel import distributed as D

MASKED = -1e9  # finite: keeps gradients exact zeros instead of NaN


@dataclass
class Negatives:
    extra: torch.Tensor | None = None  # (M, D) uniform negatives, shared by all rows
    extra_ids: torch.Tensor | None = None  # (M,)
    hard: torch.Tensor | None = None  # (B, H, D) per-row hard negatives
    hard_ids: torch.Tensor | None = None  # (B, H)


class LogQ:
    """Per-draw sampling probabilities q_j of articles in the in-batch candidate stream (the correction
    is ``log(N_batch * q_j)``, the candidate's expected count among the N_batch drawn).

    ``static``: training frequencies from data.prepare (smoothed). ``streaming``: the estimate of Yi et
    al. 2019 from the gap between the steps an article appears in, counted in draws (candidates seen),
    not in steps, so that it estimates the same per-draw probability as ``static``: q = (mean copies
    per appearance) / (mean draws between appearances), both moving averages, so that an article drawn
    several times a step is not capped at one per step. Every step's candidates update it (every rank sees the same
    gathered ids, so the estimate is identical everywhere). The estimates live on the training device:
    the update is a few scatter ops, no host round trip.
    """

    def __init__(self, mode: str, n_items: int, counts: torch.Tensor | None = None, alpha: float = 0.01,
                 device: torch.device | str = "cpu"):
        try:
            self.mode = LogQMode(mode)
        except ValueError:
            raise ValueError(f"loss.logq={mode!r}: expected off, static or streaming") from None
        self.n_items, self.alpha = n_items, alpha
        if self.mode == LogQMode.static:
            if counts is None:
                raise ValueError("loss.logq=static needs the item frequencies from data.prepare")
            c = counts.double() + 1.0
            self.log_prob = torch.log(c / c.sum()).float().to(device)
        elif self.mode == LogQMode.streaming:
            self.drawn = torch.zeros((), dtype=torch.float64, device=device)  # candidates seen so far
            self.last_seen = torch.zeros(n_items, dtype=torch.float64, device=device)  # ``drawn`` then
            self.gap = torch.full((n_items,), float(n_items), dtype=torch.float64, device=device)
            self.copies = torch.ones(n_items, dtype=torch.float64, device=device)  # q = copies / gap: uniform
            self._count = torch.zeros(n_items, dtype=torch.float64, device=device)

    def log_q(self, ids: torch.Tensor) -> torch.Tensor:
        if self.mode == LogQMode.static:
            return self.log_prob.to(ids.device)[ids]
        return (torch.log(self.copies.to(ids.device)[ids]) - torch.log(self.gap.to(ids.device)[ids])).float()

    def update(self, ids: torch.Tensor) -> None:
        """``ids``: every rank's positives of the step. A repeated id writes the same value each time
        (all its copies read the same old state), so no de-duplication is needed."""
        if self.mode != LogQMode.streaming:
            return
        ids = ids.to(self.gap.device)
        self._count.zero_().index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
        self.drawn += ids.numel()
        seen, old = self.last_seen[ids], self.gap[ids]
        gap = torch.where(seen > 0, self.drawn - seen, old)
        self.gap[ids] = (1 - self.alpha) * old + self.alpha * gap
        self.copies[ids] = (1 - self.alpha) * self.copies[ids] + self.alpha * self._count[ids]
        self.last_seen[ids] = self.drawn

    def state_dict(self) -> dict:
        if self.mode != LogQMode.streaming:
            return {}
        return {"drawn": self.drawn, "last_seen": self.last_seen, "gap": self.gap, "copies": self.copies}

    def load_state_dict(self, state: dict) -> None:
        if self.mode == LogQMode.streaming:
            self.drawn.copy_(state["drawn"])
            self.last_seen.copy_(state["last_seen"])
            self.gap.copy_(state["gap"])
            self.copies.copy_(state["copies"])


def contrastive(scores: torch.Tensor, target: torch.Tensor, cfg, n_batch: int) -> torch.Tensor:
    """SimpleX's cosine contrastive loss, mean over rows: (1 - s[b, target_b]) + w * the mean over the row's
    unmasked negatives of max(0, s - margin). The negatives are the uniform and mined ones; the other rows'
    positives (the first ``n_batch`` candidates) too only with ``loss.ccl_in_batch``: they are drawn by
    popularity, and with no logQ correction here they would push the popular articles down for everyone."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    negative = scores > MASKED * cfg.temperature / 2  # masked candidates are no negatives
    if not cfg.ccl_in_batch:
        negative[:, :n_batch] = False
    negative[rows, target] = False
    hinge = torch.relu(scores - cfg.ccl_margin) * negative
    per_row = hinge.sum(1) / negative.sum(1).clamp(min=1)
    return ((1 - scores[rows, target]) + cfg.ccl_negative_weight * per_row).mean()


def retrieval_loss(query: torch.Tensor, positive: torch.Tensor, positive_ids: torch.Tensor, cfg,
                   negatives: Negatives | None = None, logq: LogQ | None = None, group=None,
                   catalog_size: int | None = None, with_stats: bool = True,
                   bonus=None) -> tuple[torch.Tensor, dict]:
    """Mean softmax cross-entropy of each query against its positive; returns (loss, stats). ``bonus``:
    ``bonus(logits, ids)`` adds a per-(row, candidate) term to the logits, called with the shared
    candidates' ids (C,) and the hard negatives' (B, H) (trainer/model/repeats.py)."""
    negatives = negatives or Negatives()
    b = query.shape[0]
    if cfg.cross_rank and group is not None:  # the global batch's positives, in rank order
        cand, first = D.all_gather_with_grad(positive)
        cand_ids = torch.cat(D.all_gather(positive_ids))
    else:
        cand, first, cand_ids = positive, 0, positive_ids
    target = torch.arange(b, device=query.device) + first
    n_batch = cand.shape[0]
    batch_cand = cand
    correction = []
    ccl = cfg.kind == "ccl"
    if ccl:  # cosines, whatever the towers' normalisation
        query, cand = F.normalize(query, dim=-1), F.normalize(cand, dim=-1)
        batch_cand = cand
        unit = lambda t: None if t is None else F.normalize(t, dim=-1)  # noqa: E731
        negatives = Negatives(unit(negatives.extra), negatives.extra_ids, unit(negatives.hard), negatives.hard_ids)
    if logq is not None and logq.mode != LogQMode.off and not ccl:
        correction.append(math.log(n_batch) + logq.log_q(cand_ids))
    if negatives.extra is not None:
        m = negatives.extra.shape[0]
        cand = torch.cat([cand, negatives.extra])
        cand_ids = torch.cat([cand_ids, negatives.extra_ids])
        if correction:
            n_cat = catalog_size or int(cand_ids.max()) + 1
            correction.append(torch.full((m,), math.log(m / n_cat), device=query.device))
    if correction:  # logits minus the correction in one GEMM (scale the small side, not the B x N matrix)
        bias = -torch.cat(correction).to(query.dtype)
        logits = torch.addmm(bias[None, :].expand(b, -1), query / cfg.temperature, cand.T)
    else:
        logits = (query / cfg.temperature) @ cand.T
    if bonus is not None:
        logits = bonus(logits, cand_ids, bias if correction else None)
    if cfg.mask_accidental_hits:
        hit = cand_ids[None, :] == positive_ids[:, None]
        hit[torch.arange(b, device=hit.device), target] = False
        logits.masked_fill_(hit, MASKED)
    if negatives.hard is not None:
        hard_logits = torch.einsum("bd,bhd->bh", query, negatives.hard) / cfg.temperature
        if bonus is not None:
            hard_logits = bonus(hard_logits, negatives.hard_ids, None)
        hard_logits = hard_logits.masked_fill(negatives.hard_ids == positive_ids[:, None], MASKED)
        logits = torch.cat([logits, hard_logits], dim=1)
    loss = contrastive(logits * cfg.temperature, target, cfg, n_batch) if ccl else F.cross_entropy(logits, target)
    stats = {"candidates": int(logits.shape[1])}
    if with_stats:
        with torch.no_grad():
            # by raw similarity, as retrieval ranks (the logQ-corrected logits favour rare articles)
            best = cand_ids[(query @ cand.T).argmax(dim=1)]
            stats["in_batch_acc"] = float((best == positive_ids).float().mean())
            # The plain in-batch softmax loss (no logQ correction, no extra or hard negatives): a number a
            # person can read, starting near log(batch) and going down as the model learns. The
            # objective itself moves with the streaming logQ estimates.
            plain = (query.float() / cfg.temperature) @ batch_cand.float().T
            if cfg.mask_accidental_hits:
                plain.masked_fill_(hit[:, :n_batch], MASKED)
            stats["in_batch_loss"] = F.cross_entropy(plain, target).detach()
    return loss, stats
