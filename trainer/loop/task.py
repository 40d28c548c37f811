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
from trainer.model.repeats import add_bonus, mix_recent, recent_articles, repeat_bias, repeat_head
from trainer.model.sales import RecentSales, sales_bias
from trainer.model.towers import POSITION_PREFIX
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
                 autocast: torch.dtype | None = None, sales: RecentSales | None = None):
        self.model, self.keys, self.cfg, self.logq, self.miner = model, keys, loss_cfg, logq, miner
        self.tables, self.n_items, self.seed, self.device = tables, n_items, seed, device
        self.autocast = autocast  # bfloat16 for the towers and logits (trainer.precision=bf16), or None
        self.item_features: ItemFeatures | None = None  # built on first use (mined hard negatives only)
        self.step = 0  # the step being trained (for the miner's draws), set by the loop
        self.with_stats = True  # the loop turns the stats (a host sync) on for logging steps only
        self.sales = sales  # recent sales as a score bonus (trainer/model/sales.py), or None
        self._bias = None  # the model's sales_bias parameter, found on first use
        self._repeat = None  # the model's repeat_bias parameter (False: none), found on first use

    def __call__(self, inp: ModelInput) -> tuple[torch.Tensor, dict, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            return self._loss(inp)

    def _loss(self, inp: ModelInput) -> tuple[torch.Tensor, dict, torch.Tensor]:
        b = len(inp)
        q_all, i_all = self.model(inp.sparse, inp.query_dense, b)  # extra rows: item tower only
        q, pos = q_all[:b], i_all[:b]
        neg = Negatives()
        if self.cfg.mixed_negatives > 0:  # this rank's share of the global batch's draws: gather them all
            sizes = shares(self.cfg.mixed_negatives, D.world_size())
            neg.extra, _ = D.all_gather_with_grad(i_all[b:], sizes)
            neg.extra_ids = D.all_gather_rows(inp.extra_ids, sizes)
        if self.miner is not None and self.miner.ready:
            neg.hard, neg.hard_ids = self._hard_negatives(inp, q)
        loss, stats = retrieval_loss(q, pos, inp.article_idx, self.cfg, neg, self.logq,
                                     group=True if self.cfg.cross_rank else None, catalog_size=self.n_items,
                                     with_stats=self.with_stats, bonus=self._bonus(inp, b, q, pos, neg))
        return loss, stats, inp.article_idx

    def _bonus(self, inp: ModelInput, b: int, q: torch.Tensor, pos: torch.Tensor, neg: Negatives):
        """The loss's per-(row, candidate) logit terms: recent sales (trainer/model/sales.py) and buying
        again (trainer/model/repeats.py), both learned in dot-product units like the towers' scores; or None.
        Each term is ``term(logits, ids, shift)``, ``shift`` the candidates' logQ correction (or None)."""
        if self._bias is None:  # the model's parameters, found on first use (False: none)
            self._bias = sales_bias(self.model) if self.sales is not None else False
            self._repeat = repeat_bias(self.model)
            self._repeat = False if self._repeat is None else self._repeat
            self._head = repeat_head(self.model)
        terms = []
        t = 1.0 / self.cfg.temperature
        if self._bias is not False:
            terms.append(lambda logits, ids, shift: self.sales.add_bonus(logits, inp.week, ids, self._bias, t))
        if self._repeat is not False:
            recent = recent_articles(inp.sparse, b, self._repeat.shape[0])
            if self._head is not None:
                # the level reads the query vector, it does not train it; and moves with the query's
                # scores, so raising every score alike cannot lower the buying-again mass
                level = (self._repeat[None, :] + self._head(q.detach()) + reference(q, pos, neg)[:, None]) * t
                terms.append(lambda logits, ids, shift: mix_recent(logits, recent, ids, level, shift))
            else:
                bias = self._repeat * t
                terms.append(lambda logits, ids, shift: add_bonus(logits, recent, ids, bias))
        if not terms:
            return None

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
            recent = recent_articles(inp.sparse, b, positions)
            lengths, values = torch.full((b,), positions, device=recent.device), recent.reshape(-1)
        hard_ids = self.miner.mine(q, inp.article_idx, lengths, values, self.seed, self.step,
                                   first_row=D.rank() * b, global_rows=b * D.world_size())
        if self.item_features is None:
            self.item_features = ItemFeatures(self.tables, self.keys, self.device)
        h_inp = self.item_features.model_input(hard_ids)
        # one (ignored) query row: the sequence encoder's attention cannot run on an empty batch
        _, h = self.model(h_inp.sparse, h_inp.query_dense, 1)
        return h.view(b, -1, h.shape[-1]), hard_ids

    def after_step(self, positive_ids: torch.Tensor, step: int) -> None:
        """Feeds every rank's positives of the step into the streaming logQ estimate."""
        if self.logq.mode == "streaming":
            self.logq.update(torch.cat(D.all_gather(positive_ids)))
