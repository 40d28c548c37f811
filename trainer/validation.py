"""Per-epoch validation: the model's full-catalogue ranking of the validation customers, scored by
trainer.metrics (Recall@K, NDCG@K, MAP@12, ...), with exact search over every article."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import torch

from data.io import join
from trainer import distributed as D
from trainer.inference import Embedder
from trainer.metrics import evaluate
from trainer.repeats import boost_recent
from trainer.search import seen_lists, subset, top_k


def training_purchases(prepared: str, customers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets, article_idx) of the distinct articles each of ``customers`` bought in the training
    examples, in the order of ``customers``."""
    ex = pq.read_table(join(prepared, "examples"), columns=["customer_idx", "article_idx"])
    return seen_lists(ex["customer_idx"].to_numpy(), ex["article_idx"].to_numpy(), customers)


def targets_csr(table) -> tuple[np.ndarray, np.ndarray]:
    t = table["targets"].combine_chunks()
    off = t.offsets.to_numpy().astype(np.int64)
    return off - off[0], t.values.to_numpy().astype(np.int64)[off[0]:off[-1]]


@torch.no_grad()
def validate(embedder: Embedder, ks, period: str = "val", check_stop: Callable[[], None] | None = None,
             seen: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Metrics at each k of ``ks`` over the period's customers. ``seen``: a CSR of articles per customer
    (rows of the period's table) left out of the ranking. ``check_stop`` is called (on every rank, at
    the same points) between chunks, so a stop signal does not wait for the whole pass."""
    table = embedder.eval_rows(period)
    items = embedder.items()
    if check_stop:
        check_stop()
    k_max = max(int(k) for k in ks)
    bonus = embedder.repeat_bonus() if seen is None else None  # nothing bought before can come back
    if bonus is not None:
        hist = table["history"].combine_chunks()
        h_off, h_val = hist.offsets.to_numpy().astype(np.int64), hist.values.to_numpy()
        item_np = items.float().cpu().numpy()
    ranked, done = [], []
    for rows, q in embedder.query_chunks(table):
        own = subset(seen, rows) if seen is not None else None
        width = k_max + (len(bonus) if bonus is not None else 0)
        top = top_k(q, items, width, exclude_items=[0], seen=own)  # row 0: the OOV bucket
        if bonus is not None:
            off, vals = subset((h_off - h_off[0], h_val[h_off[0]:]), rows)
            top = torch.from_numpy(boost_recent(top.cpu().numpy(), q.float().cpu().numpy(), item_np, off, vals,
                                                bonus, k_max, embedder.repeat_level(q, items), embedder.temperature))
        ranked.append(top.reshape(len(rows), k_max))
        done.append(rows)
        if check_stop:
            check_stop()
    everyone = D.gather_in_order(torch.cat(ranked).to(embedder.device), np.concatenate(done), table.num_rows)
    everyone = everyone.cpu().numpy()
    off, vals = targets_csr(table)
    return evaluate(everyone, off, vals, ks=tuple(int(k) for k in ks), catalog_size=embedder.n_items - 1)
