"""Features: customer and article feature tables, purchase histories, time of year.

Histories are leakage-free by construction: a query (customer c, day d) sees only source events of c
on days strictly before d, and the caller chooses which events are a source (training rows only).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data import vocab
from data.catalogue import ARTICLE_FEATURES, article_column, desc_tokens  # noqa: F401  (re-exported)
from data.jagged import Jagged

CUSTOMER_FEATURES = ("age_bucket", "club_status", "news_freq", "postal_code")
CUSTOMER_VOCAB_COLUMNS = {"club_status": "club_member_status", "news_freq": "fashion_news_frequency"}


def age_bucket(age: pa.Array | pa.ChunkedArray, edges: list[int]) -> np.ndarray:
    """0 for a missing age, else 1 + the number of edges <= age."""
    a = pc.fill_null(pc.cast(age, pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    out = np.digitize(a, np.asarray(edges, dtype=float)) + 1
    return np.where(np.isnan(a), 0, out).astype(np.int32)


def customer_table(customers: pa.Table, vocabs: dict, cfg) -> tuple[pa.Table, dict]:
    """customer_idx plus one int32 index column per customer feature; returns cardinalities too."""
    idx, _ = vocab.lookup(customers["customer_id"], vocabs["customer_id"])
    cols = {"customer_idx": idx, "age_bucket": age_bucket(customers["age"], list(cfg.age_edges))}
    cards = {"customer_id": vocab.size(vocabs["customer_id"]), "age_bucket": len(cfg.age_edges) + 2}
    for feat, col in CUSTOMER_VOCAB_COLUMNS.items():
        cols[feat], _ = vocab.lookup(customers[col], vocabs[feat])
        cards[feat] = vocab.size(vocabs[feat])
    cols["postal_code"] = vocab.stable_hash(customers["postal_code"], cfg.postal_buckets)
    cards["postal_code"] = cfg.postal_buckets
    table = pa.table({k: pa.array(v, pa.int32()) for k, v in cols.items()})
    return table.sort_by("customer_idx"), cards


def article_table(articles: pa.Table, vocabs: dict, cfg) -> tuple[pa.Table, dict]:
    idx, _ = vocab.lookup(articles["article_id"], vocabs["article_id"])
    cols = {"article_idx": pa.array(idx, pa.int32())}
    cards = {"article_id": vocab.size(vocabs["article_id"])}
    for feat in ARTICLE_FEATURES:
        v, _ = vocab.lookup(article_column(articles, feat), vocabs[feat])
        cols[feat] = pa.array(v, pa.int32())
        cards[feat] = vocab.size(vocabs[feat])
    if cfg.desc_tokens:
        cols["desc_tokens"] = desc_tokens(articles["detail_desc"], cfg.desc_buckets, cfg.desc_max_tokens)
        cards["desc_tokens"] = cfg.desc_buckets
    return pa.table(cols).sort_by("article_idx"), cards


def time_of_year(day: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of the day's position in its year (day = days since 1970-01-01)."""
    uniq, inverse = np.unique(day, return_inverse=True)  # a batch spans few days: compute those once
    s, c = _time_of_year(uniq)
    return s[inverse], c[inverse]


def _time_of_year(day: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = day.astype("datetime64[D]")
    start = d.astype("datetime64[Y]").astype("datetime64[D]")
    frac = (d - start).astype(np.float64) / 365.25
    return np.sin(2 * np.pi * frac).astype(np.float32), np.cos(2 * np.pi * frac).astype(np.float32)


class EventLog:
    """Purchases sorted by (customer, day, original order), searchable for histories."""

    def __init__(self, customer: np.ndarray, day: np.ndarray, article: np.ndarray, order: np.ndarray | None = None):
        self.rows = np.arange(len(day)) if order is None else np.asarray(order)  # each event's original row
        sort = np.lexsort((self.rows, day, customer))
        self.key = _key(customer[sort], day[sort])
        self.article = article[sort].astype(np.int32)
        self.customer = customer[sort]
        self.sorted_rows = self.rows[sort]

    def history_before_rows(self, rows: np.ndarray, n: int) -> Jagged:
        """For each event of the log given by its original row: the customer's last ``n`` articles before
        it, earlier rows of the same day included (for data whose day holds a whole ordered session)."""
        by_row = np.argsort(self.sorted_rows, kind="stable")
        pos = by_row[np.searchsorted(self.sorted_rows[by_row], rows)]
        first = np.searchsorted(self.customer, self.customer[pos], side="left")
        return _slices(self.article, np.maximum(first, pos - n), pos)

    def history(self, customer: np.ndarray, day: np.ndarray, n: int) -> Jagged:
        """For each query (customer, day): the customer's last ``n`` articles strictly before ``day``,
        oldest first."""
        hi = np.searchsorted(self.key, _key(customer, day), side="left")
        first = np.searchsorted(self.key, _key(customer, np.zeros_like(day)), side="left")
        return _slices(self.article, np.maximum(first, hi - n), hi)


class UnorderedLog(EventLog):
    """Purchases whose order means nothing (``prepare.history_order=none``): each customer's events in a
    random order (from ``seed``), so a history is a random sample of the customer's other events, not their
    latest."""

    def __init__(self, customer: np.ndarray, day: np.ndarray, article: np.ndarray, order: np.ndarray | None = None,
                 seed: int = 0):
        self.rows = np.arange(len(day)) if order is None else np.asarray(order)
        draw = np.random.default_rng([seed, 15485863]).random(len(day))
        sort = np.lexsort((draw, customer))
        self.customer, self.article = customer[sort], article[sort].astype(np.int32)
        self.sorted_rows = self.rows[sort]
        self.key = self.customer.astype(np.int64)

    def history_before_rows(self, rows: np.ndarray, n: int) -> Jagged:
        """For each event (by original row): up to ``n`` of the customer's other events, the ones before it
        in the random order, wrapping round (an event is never its own history)."""
        by_row = np.argsort(self.sorted_rows, kind="stable")
        pos = by_row[np.searchsorted(self.sorted_rows[by_row], rows)]
        first = np.searchsorted(self.customer, self.customer[pos], side="left")
        count = np.searchsorted(self.customer, self.customer[pos], side="right") - first
        lengths = np.minimum(n, count - 1)
        offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
        back = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths) + 1  # 1..length
        at = np.repeat(first, lengths) + (np.repeat(pos - first, lengths) - back) % np.repeat(count, lengths)
        return Jagged(offsets, self.article[at])

    def history(self, customer: np.ndarray, day: np.ndarray, n: int) -> Jagged:
        """For each query: up to ``n`` of the customer's events (the day is not looked at: the log holds
        only what the query may know)."""
        lo = np.searchsorted(self.key, customer.astype(np.int64), side="left")
        hi = np.minimum(np.searchsorted(self.key, customer.astype(np.int64), side="right"), lo + n)
        return _slices(self.article, lo, hi)


def first_sale_days(a: np.ndarray, d: np.ndarray, n_items: int) -> np.ndarray:
    """(catalogue,) int32 the day of each article's first purchase among the given rows; -1 for none."""
    out = np.full(n_items, -1, np.int32)
    order = np.argsort(d, kind="stable")
    articles, first = np.unique(a[order], return_index=True)
    out[articles] = d[order][first]
    return out


def best_sellers(article: np.ndarray, day: np.ndarray, before: int, n_articles: int, k: int,
                 days: int = 7) -> np.ndarray:
    """The ``k`` most bought article rows in the ``days`` before day ``before`` (ties by row; never the OOV
    row 0): the cold-start list of recommend and of the serving bundle."""
    recent = (day >= before - days) & (day < before)
    order = np.argsort(-np.bincount(article[recent], minlength=n_articles), kind="stable")
    return order[order != 0][:k]


def _slices(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> Jagged:
    """Row i: ``values[lo[i]:hi[i]]``, gathered in one vectorised take."""
    lengths = hi - lo
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    at = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths) + np.repeat(lo, lengths)
    return Jagged(offsets, values[at])


def _key(customer: np.ndarray, day: np.ndarray) -> np.ndarray:
    return (customer.astype(np.int64) << 32) | day.astype(np.int64)


def list_array(lists: Jagged) -> pa.Array:
    offsets, values = lists.offsets, lists.values
    typ = pa.large_list(pa.int32()) if offsets[-1] >= 2**31 else pa.list_(pa.int32())
    off = pa.array(offsets, pa.int64() if offsets[-1] >= 2**31 else pa.int32())
    cls = pa.LargeListArray if offsets[-1] >= 2**31 else pa.ListArray
    arr = cls.from_arrays(off, pa.array(values, pa.int32()))
    return arr.cast(typ)
