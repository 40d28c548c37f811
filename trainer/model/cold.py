"""Articles the model never trained on: placed by their features alone.

A retailer's catalogue changes weekly: an article that has not sold before the training cut has an id row
that no step updated (worse: the uniform negatives pushed it away from every customer). Two halves fix it:

- ``IdDropout`` (training, ``model.id_dropout``): for each global batch a share of the catalogue's articles
  enter the item tower with the OOV id (row 0: "an article not known by id"), their other features
  unchanged, so the item tower learns to place an article from its features alone. Which articles is a
  function of (seed, epoch, global batch, article): the same at any world size, in every row the article
  appears in (positive or uniform negative). Row 0 is the history's padding id too; the transformer masks
  padding and the bag never holds it, so the two uses do not meet.
- ``cold_articles`` (scoring, ``model.cold_start_sales``): articles with fewer training purchases than that
  are embedded with the OOV id, the way dropout trained the tower to see them; the others by id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from data import features
from data.io import join

SALT = 0x636F6C64  # keeps these draws apart from every other seeded draw


def _uniform(seed: int, epoch: int, batch: int, articles: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) per article, hashed from (seed, epoch, batch, article): splitmix64's finaliser."""
    key = np.uint64((hash((seed, SALT, epoch, batch)) & 0xFFFFFFFFFFFFFFFF))
    with np.errstate(over="ignore"):
        x = articles.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + key
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class IdDropout:
    """The stream's ``item_ids`` hook: the article_id feature with a ``rate`` share of articles as OOV; with
    ``first_sold`` and ``fresh_days``, also every purchase (a row with its ``days``) of an article first sold
    fewer than ``fresh_days`` days before it: a launch is learned as scoring will see one, by its features."""

    rate: float
    seed: int
    first_sold: np.ndarray | None = None  # (catalogue,) first training purchase day, -1: none
    fresh_days: int = 0

    def __call__(self, epoch: int, batch: int, articles: np.ndarray, days: np.ndarray | None = None) -> np.ndarray:
        dropped = _uniform(self.seed, epoch, batch, articles) < self.rate
        if days is not None and self.fresh_days > 0 and self.first_sold is not None:
            dropped |= days.astype(np.int64) - self.first_sold[articles] < self.fresh_days
        return np.where(dropped, 0, articles).astype(np.int32)


def training_sales(prepared: str, n_items: int) -> np.ndarray:
    """(catalogue,) training purchases per article over the whole training period (``sold``; a dataset
    prepared before it was recorded: its examples' ``count``)."""
    table = pq.read_table(join(prepared, "item_freq.parquet"))
    column = "sold" if "sold" in table.column_names else "count"
    out = np.zeros(n_items, np.int64)
    out[table["article_idx"].to_numpy()] = table[column].to_numpy()
    return out


def cold_articles(prepared: str, n_items: int, min_sales: int) -> np.ndarray:
    """(catalogue,) bool: the articles scored by their features alone (fewer than ``min_sales`` training
    purchases; never the OOV row, which is that already)."""
    if min_sales <= 0:
        return np.zeros(n_items, bool)
    cold = training_sales(prepared, n_items) < min_sales
    cold[0] = False
    return cold


def scoring_ids(articles: np.ndarray, cold: np.ndarray) -> np.ndarray:
    """The article_id feature to embed ``articles`` with: OOV for the cold ones."""
    return np.where(cold[articles], 0, articles).astype(np.int32)


def first_sold(prepared: str, n_items: int) -> np.ndarray:
    """(catalogue,) each article's first training purchase day, -1 for none (a dataset prepared before
    the day was recorded: from its training examples)."""
    t = pq.read_table(join(prepared, "item_freq.parquet"))
    out = np.full(n_items, -1, np.int64)
    if "first_sold" in t.column_names:
        out[t["article_idx"].to_numpy()] = t["first_sold"].to_numpy()
        return out
    ex = pq.read_table(join(prepared, "examples"), columns=["article_idx", "day"])
    return features.first_sale_days(ex["article_idx"].to_numpy(), ex["day"].to_numpy(), n_items).astype(np.int64)
