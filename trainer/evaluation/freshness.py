"""How a method does on new articles: Recall@K over an evaluation period's (customer, article) purchases by
the kind of article bought, and the plain list a new article's ranking has to beat.

Kinds, relative to the period's query day and the training purchases (prepare's ``item_freq.parquet``):

- ``never_sold``: no training purchase at all (a launch in the period, or an article listed but unsold);
- ``new_<N>d``: first sold in the N days before the query day (``evaluate.new_article_days``, 28: the
  four weeks a fashion launch sells most);
- ``older``: first sold before that.

The ``new-article best-sellers`` list is the K most bought articles of the last 7 training days among
those first sold in the N days before the period: what a merchandiser would put in a "new in" shelf.
"""

from __future__ import annotations

import numpy as np

from data.jagged import Jagged
from trainer.model.cold import first_sold  # noqa: F401  (the evaluation reads it from here too)

KINDS = ("never_sold", "new", "older")


def kind_names(new_days: int) -> list[str]:
    return ["never_sold", f"new_{new_days}d", "older"]


def pair_kinds(first: np.ndarray, targets: Jagged, days: np.ndarray, new_days: int) -> np.ndarray:
    """(pairs,) int8 the kind of each (customer, article) target pair, as of its customer's query day:
    0 never sold before it, 1 first sold in the ``new_days`` before it, 2 older."""
    f = first[targets.values.astype(np.int64)]
    day = days[targets.owners()].astype(np.int64)
    never = (f < 0) | (f >= day)
    new = ~never & (f >= day - new_days)
    return np.where(never, 0, np.where(new, 1, 2)).astype(np.int8)


def recall_by_kind(ranked: np.ndarray, targets: Jagged, kind: np.ndarray, k: int, new_days: int) -> dict:
    """Recall@k over (customer, article) target pairs of each kind (``pair_kinds``): hits / pairs, the
    pairs counted and their share."""
    owners, items = targets.owners(), targets.values.astype(np.int64)
    hit = (ranked[:, :k][owners] == items[:, None]).any(1)
    out = {}
    for j, name in enumerate(kind_names(new_days)):
        mask = kind == j
        out[name] = {f"recall@{k}": float(hit[mask].mean()) if mask.any() else float("nan"),
                     "pairs": int(mask.sum()), "share": float(mask.mean()) if len(mask) else 0.0}
    return out


def new_best_sellers(article: np.ndarray, day: np.ndarray, first: np.ndarray, before: int, new_days: int,
                     k: int, days: int = 7) -> np.ndarray:
    """The ``k`` most bought articles in the ``days`` before ``before`` among those first sold in the
    ``new_days`` before it (fewer when fewer sold); ties by row."""
    recent = (day >= before - days) & (day < before)
    counts = np.bincount(article[recent], minlength=len(first)).astype(np.float64)
    fresh = (first >= before - new_days) & (first < before)
    counts[~fresh] = -1
    counts[0] = -1
    order = np.argsort(-counts, kind="stable")
    return order[counts[order] > 0][:k]
