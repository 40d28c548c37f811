"""Item and query embeddings from a model: the one being trained, or a trained run loaded weights-only
(trainer/loop/runs.py ``load_run``).

Every rank computes a slice and the slices are all-gathered; every rank makes the same number of
forward calls (the sharded tables need all of them). Export, recommend and per-epoch validation use it.

    embedder, run = load_run("runs/small/train")  # its selected checkpoint, under its own config
    items = embedder.items()                           # (catalogue, D), row 0 the OOV bucket
    customers, users = embedder.eval_queries("val")    # every evaluation customer of a period
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq
import torch

from data.batch import packed_from_arrays
from data.io import join
from data.jagged import Jagged
from data.prepared import Prepared
from data.tables import FeatureTables
from trainer.model.cold import cold_articles, scoring_ids
from trainer.model.inputs import model_input
from trainer.model.towers import unwrap
from trainer.retrieval.ranker import Queries
from trainer.parallel import distributed as D

log = logging.getLogger(__name__)


class Embedder:
    def __init__(self, model, keys: list[str], ds: Prepared, device: torch.device,
                 tables: FeatureTables | None = None, temperature: float = 0.05, cold_start_sales: int = 0):
        self.temperature = temperature  # the loss's: the buying-again mixture scores in its units
        self.model, self.keys, self.ds, self.device = model, keys, ds, device
        self.prepared = ds.url
        self.tables = tables or FeatureTables(ds)
        terms = unwrap(model)
        # terms that are columns of the scoring vectors (recent sales: trainer/model/sales.py), and buying
        # again, which the Retriever applies apart (trainer/model/repeats.py)
        self.columns = [t for t in terms.scoring_terms() if getattr(t, "scoring_columns", 0)]
        self.repeats = terms.repeats
        self.n_items = ds.n_articles
        self.last_day = ds.last_day
        # articles placed by their features alone (trainer/model/cold.py): too few training purchases
        self.cold = cold_articles(ds.url, self.n_items, cold_start_sales)

    def repeat_bonus(self) -> np.ndarray | None:
        """The learned bonus per history position, newest first (trainer/model/repeats.py), or None."""
        return None if self.repeats is None else self.repeats.bonus()

    def repeat_mixture(self) -> bool:
        """Whether buying again scores as the mixture (a level per customer) rather than a bonus."""
        return self.repeats is not None and self.repeats.mixture

    def as_queries(self, q: torch.Tensor, items: torch.Tensor, levels: bool = True) -> Queries:
        """Scoring vectors ``q`` as the ranker reads them: with each one's buying-again level (the mixture;
        ``levels=False`` when the ranking will not read them, e.g. bought articles left out)."""
        return Queries(q, self.repeat_level(q, items) if levels else None)

    def repeat_level(self, q: torch.Tensor, items: torch.Tensor) -> np.ndarray | None:
        """(n,) each query's buying-again level (trainer/model/repeats.py), in score units, from its scoring
        vector and the catalogue's (:meth:`items`); None when the model scores repeats by the bonus."""
        if not self.repeat_mixture():
            return None
        d = q.shape[1] - sum(t.scoring_columns for t in self.columns)  # the towers' dimensions only
        q = q[:, :d].to(self.device).float()
        mean_item = items[1:, :d].to(self.device).float().mean(0)  # row 0: the OOV bucket, never drawn
        return self.repeats.scoring_level(q, mean_item)

    # ------------------------------------------------------------ embeddings

    def _forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers in eval mode (no dropout), the model's mode restored after."""
        inp = model_input(batch, self.keys, self.device)
        training = self.model.training
        self.model.eval()
        try:
            return self.model(inp.sparse, inp.query_dense, len(inp))
        finally:
            self.model.train(training)

    @torch.no_grad()
    def items(self, chunk: int = 8192, check_stop=None, scoring: bool = True) -> torch.Tensor:
        """(catalogue, D) for every article_idx, on this rank's device, identical on every rank.
        ``check_stop`` is called between chunks (the same number on every rank). ``scoring``: with the
        recent-sales bonus as of the week after training (D + 1 columns, to score against
        :meth:`queries`); else the item tower's vectors alone."""
        n = self.n_items
        rows, out = [], []
        for part in D.dealt_chunks(n, chunk):
            arts = part if len(part) else np.zeros(1, np.int64)
            batch = packed_from_arrays(self.tables, np.zeros(len(arts)), arts, np.full(len(arts), self.last_day),
                                       item_ids=scoring_ids(arts, self.cold))
            out.append(self._forward(batch)[1][:len(part)])
            rows.append(part)
            if check_stop:
                check_stop()
        everyone = D.gather_in_order(torch.cat(out), np.concatenate(rows), n)
        for term in self.columns if scoring else []:
            everyone = term.scoring_item(everyone, torch.arange(n, device=everyone.device))
        return everyone

    @torch.no_grad()
    def queries(self, customer: np.ndarray, day: np.ndarray, history: Jagged) -> torch.Tensor:
        """Query vectors of the given rows (no collective: the caller keeps the ranks in step), for scoring
        against :meth:`items` (with recent sales: one more column, 1). ``history``: oldest first."""
        batch = packed_from_arrays(self.tables, customer, np.zeros(len(customer)), day, history)
        q = self._forward(batch)[0]
        for term in self.columns:
            q = term.scoring_query(q)
        return q

    def eval_rows(self, period: str):
        """The evaluation table of a period (``val`` or ``test``)."""
        return pq.read_table(join(self.prepared, "eval", f"{period}.parquet"))

    def query_chunks(self, table, chunk: int = 4096):
        """Yields (row indices, query vectors) for this rank's chunks of ``table`` (:func:`dealt_chunks`);
        every rank yields the same number of chunks (a rank past its rows computes one dummy row and
        yields an empty chunk)."""
        for rows in D.dealt_chunks(table.num_rows, chunk):
            sub = table.take(rows if len(rows) else np.zeros(1, np.int64))
            q = self.queries(sub["customer_idx"].to_numpy(), sub["day"].to_numpy(), Jagged.from_arrow(sub["history"]))
            yield rows, q[:len(rows)]

    @torch.no_grad()
    def eval_queries(self, period: str) -> tuple[np.ndarray, torch.Tensor]:
        """(customer_idx, query vectors) of every customer of an evaluation period, on every rank."""
        table = self.eval_rows(period)
        rows, qs = zip(*self.query_chunks(table))
        return table["customer_idx"].to_numpy(), D.gather_in_order(torch.cat(qs), np.concatenate(rows), table.num_rows)

