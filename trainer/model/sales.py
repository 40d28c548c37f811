"""Recent sales: what an article sold in the week before, as a learned bonus to its score.

Fashion demand moves week by week (launches, decay, seasons); the towers see an article's features but
not its sales as of the day a customer shops. Each article's purchases in the week before a row's week
are bucketed (about log2 steps) and each bucket has a learned score bonus ``bias[bucket]`` (the model's
``SalesTerm.bias``). The bonus depends on the row (its week) and the candidate: training adds it (over the temperature) to every candidate's logit through the loss's bonus hook
(:meth:`RecentSales.add_bonus`). For scoring (validation, export, recommend) everything is as of the
first week after training, which makes it an inner product, so export and the FAISS index need
nothing new:

    query' = [query, 1]        item' = [item, bias[bucket(sales of the item in the last training week)]]

With ``model.age_buckets`` a bucket is the pair (sales, age): the article's weeks since its first sale as
of the row's week (launching this week, 1, 2, ... weeks, capped), so the bonus can learn that an article
selling in its first weeks sells on (what a "new in" list of best-sellers knows). An article not sold
by the end of the row's week was not in the shop then: it is no negative for that row (masked). At
scoring time an article never sold in training counts as launching.

The table comes from data.prepare (``item_week_sales.parquet``; weeks counted back from the end of
training; ``item_freq.parquet``'s first sale days); a row's week is read off its day
(:meth:`RecentSales.week_of`). The model holds the term as a
typed submodule (:class:`SalesTerm`, ``TwoTower.sales``): its parameter, and the table attached by whoever
builds the model for a prepared dataset.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from data.io import fs_and_path, join

MASKED = -1e9  # as the loss's masked logits (trainer/model/loss.py)


def buckets_of(counts: np.ndarray, n_buckets: int) -> np.ndarray:
    """0 for no sales, then half-log2 steps: 1 -> 2, 2 -> 4 (3.2), 3 -> 4, 7 -> 6, 1000 -> 20, capped."""
    return np.minimum(np.ceil(2 * np.log2(1 + counts.astype(np.float64))), n_buckets - 1).astype(np.uint8)


def age_buckets_of(first_sold: np.ndarray, week_starts: np.ndarray, n_age: int,
                   listed_rows: int | None = None, listed_day: np.ndarray | None = None) -> np.ndarray:
    """(weeks, catalogue) an article's age as of each week's first day: 0 not sold by the week's end (not
    in the shop yet: masked as a training negative), 1 first sold within the week (launching), 1 + j first
    sold j weeks before it, capped at ``n_age - 1``. The last week (scoring's, after training) places the
    articles never sold in training as launching: they are in the catalogue. With ``listed_rows`` (the
    article rows the previous vocabulary version held: data/prepared.py ``parent_rows``) only the rows
    listed since are launching; an older row that never sold has been in the shop a week or more without
    a sale and is scored as the oldest articles that sold nothing last week (``n_age - 1``), not as a launch.
    With ``listed_day`` (each row's day in the shop, -1 unknown: data/prepared.py ``listing_days``) an article
    listed by a week's end that had not sold is in the shop that week, aged by its listing: launching in
    its listing week, and so a negative there, so the launch bonus is learned over every listing and not only
    over those that sold at once."""
    start, f = week_starts[:, None].astype(np.int64), first_sold[None, :].astype(np.int64)
    never = f < 0
    launching = ~never & (f >= start) & (f < start + 7)
    weeks_since = -(-(start - f) // 7)  # ceil, >= 1 for an article first sold before the week
    out = np.where(never | (f >= start + 7), 0, np.where(launching, 1, 1 + np.minimum(weeks_since, n_age - 2)))
    if listed_day is not None:
        listed = listed_day[None, :].astype(np.int64)
        unsold_in_shop = (out == 0) & (listed >= 0) & (listed < start + 7)
        by_listing = np.where(listed >= start, 1, 1 + np.minimum(-(-(start - listed) // 7), n_age - 2))
        out = np.where(unsold_in_shop, by_listing, out)
    unsold = np.flatnonzero(never[0])
    if listed_rows is None:
        out[-1, unsold] = 1
    else:  # launching: the rows listed since the parent; older unsold rows aged by their listing when known
        out[-1, unsold[unsold >= listed_rows]] = 1
        older = unsold[unsold < listed_rows]
        out[-1, older if listed_day is None else older[listed_day[older] < 0]] = n_age - 1
    return out.astype(np.int16)


class RecentSales:
    def __init__(self, prepared: str, info: dict | None, n_items: int, n_buckets: int,
                 device: torch.device | str = "cpu", first_sold: np.ndarray | None = None, n_age: int = 0,
                 listed_rows: int | None = None, listed_day: np.ndarray | None = None):
        """``info``: the prepared dataset's ``recent_sales`` entry; ``n_items``: its article rows. With
        ``n_age`` > 0 a bucket is the pair (sales, age: :func:`age_buckets_of` of ``first_sold``, each
        article's first training purchase day or -1, ``listed_rows`` and ``listed_day``), ``n_buckets * n_age``
        of them."""
        url = join(prepared, "item_week_sales.parquet")
        if info is None or not fs_and_path(url)[0].exists(fs_and_path(url)[1]):
            raise FileNotFoundError(f"{prepared}: the prepared data has no recent sales (item_week_sales.parquet); "
                                    "re-run data.prepare, or train with model.recent_sales_buckets=0")
        if not 2 <= n_buckets <= 256:
            raise ValueError(f"model.recent_sales_buckets={n_buckets}: expected 2..256 (or 0: off)")
        if n_age and not 3 <= n_age <= 64:
            raise ValueError(f"model.age_buckets={n_age}: expected 3..64 (or 0: off)")
        self.weeks, self.n_age = int(info["weeks"]), int(n_age)
        # whether scoring's launches are the articles listed since the parent (else: every unsold one)
        self.knows_launches = bool(self.n_age) and listed_rows is not None
        self.n_buckets = n_buckets * max(1, self.n_age)
        self.end = int(np.datetime64(info["train_end"], "D").astype(np.int64))  # the first day after training
        t = pq.read_table(url)
        counts = np.zeros((self.weeks + 1, n_items), np.int64)
        # row L is read by rows of week L - weeks and holds the sales of the week before: L - weeks - 1
        row = t["week"].to_numpy().astype(np.int64) + self.weeks + 1
        keep = (row >= 0) & (row <= self.weeks)
        counts[row[keep], t["article_idx"].to_numpy()[keep]] = t["count"].to_numpy()[keep]
        table = buckets_of(counts, n_buckets).astype(np.int16)  # (weeks + 1, catalogue)
        if self.n_age:
            starts = self.end + 7 * (np.arange(self.weeks + 1) - self.weeks)
            table = table * self.n_age + age_buckets_of(first_sold, starts, self.n_age, listed_rows, listed_day)
        self.table = torch.from_numpy(table).to(device)

    def week_of(self, day: torch.Tensor) -> torch.Tensor:
        """(B,) which row of the table a day reads: ``weeks`` for the first week after training
        (evaluation) and later, ``weeks - 1`` for the last training week, ..., 0 before the data."""
        day = day.to(self.table.device).long()
        return torch.clamp(torch.div(day - self.end, 7, rounding_mode="floor") + self.weeks, 0, self.weeks)

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """The scoring query: [q, 1]."""
        return torch.cat([q, q.new_ones(q.shape[0], 1)], dim=1)

    def item(self, i: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The scoring item: [i, bias[bucket of its sales in the last training week]]."""
        ids = ids.to(self.table.device).long()
        return torch.cat([i, bias[self.table[-1, ids].long()][:, None].to(i.dtype)], dim=1)

    def add_bonus(self, logits: torch.Tensor, week: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor,
                  scale: float = 1.0) -> torch.Tensor:
        """``logits`` plus ``scale * bias[bucket]`` of each candidate's sales in the week before the row's
        (a gather by week, not a one-hot column per week in the logits GEMM). ``ids``: (C,) candidates
        shared by all rows (their bonus per week, gathered by each row's week) or (B, H) per row."""
        week = week.to(self.table.device).long()
        ids = ids.to(self.table.device).long()
        if ids.dim() == 1:
            per_week = self._bonus(self.table[:, ids].long(), bias, scale)  # (weeks + 1, C)
            return logits + per_week.index_select(0, week).to(logits.dtype)
        return logits + self._bonus(self.table[week[:, None], ids].long(), bias, scale).to(logits.dtype)

    def _bonus(self, bucket: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        """``scale * bias[bucket]``; with ages, an article not in the shop yet is no negative (masked)."""
        out = bias[bucket] * scale
        return out.masked_fill(bucket % self.n_age == 0, MASKED) if self.n_age else out


class SalesTerm(nn.Module):
    """The model's recent-sales term: a learned score bonus per bucket of sales (``bias``) and the table
    of buckets it reads (:meth:`attach`: data of the prepared run, not a parameter, not checkpointed).
    For scoring it is one column of the scoring vectors (``scoring_query`` / ``scoring_item``)."""

    scoring_columns = 1

    def __init__(self, n_buckets: int, n_age: int = 0, launch_boost: float = 0.0):
        """``launch_boost``: added to the launching, never-sold bucket's bonus at scoring time only
        (``model.launch_boost``; with ages: without them a launch and an article that stopped selling
        share a bucket)."""
        super().__init__()
        if launch_boost and not n_age:
            raise ValueError(f"model.launch_boost={launch_boost} needs model.age_buckets (a launch is an age)")
        self.bias = nn.Parameter(torch.zeros(n_buckets))
        self.launch_boost = float(launch_boost)
        self.table: RecentSales | None = None

    def attach(self, table: RecentSales) -> "SalesTerm":
        if table.n_buckets != self.bias.numel():
            raise ValueError(f"recent-sales table of {table.n_buckets} buckets for a term of {self.bias.numel()}")
        self.table = table
        return self

    def _table(self) -> RecentSales:
        if self.table is None:
            raise RuntimeError("the recent-sales term has no table attached (SalesTerm.attach)")
        return self.table

    def loss_term(self, inp, q: torch.Tensor, mean_score, scale: float):
        """The loss's bonus: ``(logits, ids, shift) -> logits`` plus each candidate's bonus as of the row's day,
        in logit units (``scale``: one over the temperature)."""
        table = self._table()
        week = table.week_of(inp.day)
        return lambda logits, ids, shift: table.add_bonus(logits, week, ids, self.bias, scale)

    def scoring_query(self, q: torch.Tensor) -> torch.Tensor:
        return self._table().query(q)

    def new_article_score(self) -> float:
        """The scoring column of an article never sold (no sales last week; launching, with ages): what an
        article added to the catalogue after training gets (a new listing: with the launch boost)."""
        table = self._table()
        return float(self.scoring_bias()[1 if table.n_age else 0])

    def scoring_bias(self) -> torch.Tensor:
        """The bonus per bucket as scoring reads it: the learned one, with the launch boost on bucket 1
        (no sales last week, launching: at scoring time only the articles nobody has bought yet)."""
        bias = self.bias.detach().clone()
        bias[1] += self.launch_boost
        return bias

    def scoring_item(self, i: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The scoring items; the launch boost only where the data tells launches from articles that never
        sold (a dataset grown from a parent: data/prepared.py ``parent_rows``)."""
        table = self._table()
        return table.item(i, ids, self.scoring_bias() if table.knows_launches else self.bias.detach())
