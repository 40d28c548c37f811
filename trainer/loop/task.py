"""The train task: a batch of model inputs to (loss, stats, positive ids).

Both towers run over the batch's joined KJT (B query rows, then the M mixed-negative rows, item tower
only); mined hard negatives, when on, take a second item-tower lookup; the loss is the sampled softmax
of trainer/model/loss.py with the streaming logQ estimate updated after each step.
"""

from __future__ import annotations

import torch

from data.shards import shares
from data.tables import FeatureTables
from trainer.model.inputs import ItemFeatures, ModelInput
from trainer.model.loss import LogQ, Negatives, retrieval_loss
from trainer.model.negatives import HardNegativeMiner
from trainer.model.towers import POSITION_PREFIX, unwrap
from trainer.parallel import distributed as D


def reference(q: torch.Tensor, pos: torch.Tensor, neg: Negatives) -> torch.Tensor:
    """(B,) each query's mean score over the catalogue, estimated from the global batch's uniform
    negatives: the buying-again level is set against it (trainer/model/repeats.py). Without them
    (``loss.mixed_negatives=0``) the global batch's positives stand in: popularity-weighted, so scoring's
    catalogue mean is then only near it."""
    items = neg.extra if neg.extra is not None and len(neg.extra) else D.all_gather_with_grad(pos)[0]
    return q @ items.mean(0)


class TrainTask:
    def __init__(self, model, keys: list[str], loss_cfg, logq: LogQ, miner: HardNegativeMiner | None,
                 tables: FeatureTables, n_items: int, seed: int, device: torch.device,
                 autocast: torch.dtype | None = None, mixed: int | None = None, table_l2: float = 0.0):
        self.model, self.keys, self.cfg, self.logq, self.miner = model, keys, loss_cfg, logq, miner
        self.tables, self.n_items, self.seed, self.device = tables, n_items, seed, device
        self.table_l2 = table_l2  # optim.table_l2: the model returns the rows it looked up
        unwrap(model).id_rows = table_l2 > 0
        self.mixed = loss_cfg.mixed_negatives if mixed is None else mixed  # uniform negatives a global batch
        self.autocast = autocast  # bfloat16 for the towers and logits (trainer.precision=bf16), or None
        self.item_features: ItemFeatures | None = None  # built on first use (mined hard negatives only)
        self.step = 0  # the step being trained (for the miner's draws)
        self.with_stats = True  # the stats (a host sync) on logging steps only
        self.terms = unwrap(model).scoring_terms()  # logit terms beside the inner product (sales, repeats)

    name = "task"

    def before_step(self, at) -> None:
        """The step's number (the miner's draws) and whether it logs (trainer/model/negatives.py StepAt)."""
        self.step, self.with_stats = at.step, at.logging

    def __call__(self, inp: ModelInput) -> tuple[torch.Tensor, dict, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            return self._loss(inp)

    def _loss(self, inp: ModelInput) -> tuple[torch.Tensor, dict, torch.Tensor]:
        b = len(inp)
        out = self.model(inp.sparse, inp.query_dense, b)  # extra rows: item tower only
        q_all, i_all = out[0], out[1]  # (indexed: under the pipeline's FX trace ``out`` is a proxy)
        q, pos = q_all[:b], i_all[:b]
        neg = Negatives()
        if self.mixed > 0:  # this rank's share of the global batch's draws: gather them all
            sizes = shares(self.mixed, D.world_size())
            neg.extra, _ = D.all_gather_with_grad(i_all[b:], sizes)
            neg.extra_ids = D.all_gather_rows(inp.extra_ids, sizes)
        if self.miner is not None and self.miner.ready:
            neg.hard, neg.hard_ids = self._hard_negatives(inp, q)
        loss, stats = retrieval_loss(q, pos, inp.article_idx, self.cfg, neg, self.logq,
                                     group=True if self.cfg.cross_rank else None, catalog_size=self.n_items,
                                     with_stats=self.with_stats, bonus=self._bonus(inp, b, q, pos, neg))
        if self.table_l2 > 0:  # the mean over this rank's rows, as the loss: the same sum over any world size
            loss = loss + self.table_l2 * sum(r.float().pow(2).sum(1).mean() for r in out[2])
        return loss, stats, inp.article_idx

    def _bonus(self, inp: ModelInput, b: int, q: torch.Tensor, pos: torch.Tensor, neg: Negatives):
        """The loss's per-(row, candidate) logit terms, each the model's scoring term's (recent sales,
        buying again: learned in dot-product units like the towers' scores), as one
        ``bonus(logits, ids, shift)`` (``shift``: the candidates' logQ correction, or None); or None."""
        if not self.terms:
            return None
        scale = 1.0 / self.cfg.temperature
        terms = [t.loss_term(inp, q, lambda: reference(q, pos, neg), scale) for t in self.terms]

        def bonus(logits, ids, shift=None):
            for term in terms:
                logits = term(logits, ids, shift)
            return logits
        return bonus

    def _hard_negatives(self, inp: ModelInput, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = len(inp)
        if "history" in inp.sparse.keys():  # the bag: the whole history (the extra rows' bags are empty)
            hist = inp.sparse["history"]
            lengths, values = hist.lengths()[:b], hist.values()
        else:  # the transformer reads the last positions only: those are the history it knows of
            positions = sum(1 for k in self.keys if k.startswith(POSITION_PREFIX))
            recent = inp.recent(positions)
            lengths, values = torch.full((b,), positions, device=recent.device), recent.reshape(-1)
        hard_ids = self.miner.mine(q, inp.article_idx, lengths, values, self.seed, self.step,
                                   first_row=D.rank() * b, global_rows=b * D.world_size())
        if self.item_features is None:
            self.item_features = ItemFeatures(self.tables, self.keys, self.device)
        h_inp = self.item_features.model_input(hard_ids)
        # one (ignored) query row: the sequence encoder's attention cannot run on an empty batch
        h = self.model(h_inp.sparse, h_inp.query_dense, 1)[1]
        return h.view(b, -1, h.shape[-1]), hard_ids

    def after_step(self, positive_ids: torch.Tensor, step: int) -> None:
        """Feeds every rank's positives of the step into the streaming logQ estimate."""
        if self.logq.mode == "streaming":
            self.logq.update(torch.cat(D.all_gather(positive_ids)))
