"""Per-epoch validation: the model's full-catalogue ranking of the validation customers, scored by
trainer/evaluation/metrics.py (Recall@K, NDCG@K, MAP@12, ...), with exact search over every article."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from data.jagged import Jagged
from trainer.evaluation.metrics import evaluate
from trainer.parallel import distributed as D
from trainer.retrieval.embedder import Embedder
from trainer.retrieval.retriever import Retriever
from trainer.retrieval.search import list_column


@torch.no_grad()
def validate(embedder: Embedder, ks, period: str = "val", check_stop: Callable[[], None] | None = None,
             seen: Jagged | None = None) -> dict:
    """Metrics at each k of ``ks`` over the period's customers. ``seen``: articles per customer (rows of
    the period's table) left out of the ranking. ``check_stop`` is called (on every rank, at
    the same points) between chunks, so a stop signal does not wait for the whole pass."""
    table = embedder.eval_rows(period)
    everyone = ranking(embedder, table, max(int(k) for k in ks), check_stop, seen)
    return evaluate(everyone, list_column(table), ks=tuple(int(k) for k in ks), catalog_size=embedder.n_items - 1)


@torch.no_grad()
def ranking(embedder: Embedder, table, k_max: int, check_stop: Callable[[], None] | None = None,
            seen: Jagged | None = None) -> np.ndarray:
    """(customers, k_max) article_idx of an evaluation table's rows by the Retriever, exact search, on
    every rank (each ranks its chunks, then all are gathered)."""
    retriever = Retriever.from_embedder(embedder)
    if check_stop:
        check_stop()
    history = list_column(table, "history") if retriever.buys_again(seen) else None
    ranked, done = [], []
    for rows, q in embedder.query_chunks(table):
        own = seen.take(rows) if seen is not None else None
        recent = history.take(rows) if history is not None else None
        top = retriever.rank(embedder.as_queries(q, retriever.items, levels=recent is not None), k_max, own, recent)
        ranked.append(torch.from_numpy(top).reshape(len(rows), k_max))
        done.append(rows)
        if check_stop:
            check_stop()
    everyone = D.gather_in_order(torch.cat(ranked).to(embedder.device), np.concatenate(done), table.num_rows)
    return everyone.cpu().numpy()
