"""What each customer bought in training: the articles validation and evaluation leave out of a ranking.
Kept out of trainer/retrieval/search.py, which serving loads: serving reads no dataset."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from data.io import join
from data.jagged import Jagged
from trainer.retrieval.search import seen_lists


def training_purchases(prepared: str, customers: np.ndarray) -> Jagged:
    """The distinct articles each of ``customers`` bought in the training examples, in the order of
    ``customers``."""
    ex = pq.read_table(join(prepared, "examples"), columns=["customer_idx", "article_idx"])
    return seen_lists(ex["customer_idx"].to_numpy(), ex["article_idx"].to_numpy(), customers)
