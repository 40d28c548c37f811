"""Per-id feature lookups for the stream and for inference: each customer's and article's features as
dense numpy arrays, the time of year of a day, article descriptions as token lists."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data import features
from data.io import fs_and_path, join, read_table
from data.prepared import Prepared
from data.shards import StreamError


class FeatureTables:
    """Per-id feature lookups held as numpy arrays (dense by index): 22 MB for H&M's customers."""

    def __init__(self, ds: Prepared):
        prepared = ds.url
        self.cards = ds.cardinalities
        self.customer_features = list(ds.customer_features)
        self.article_features = [f for f in ds.article_features if f != "desc_tokens"]
        self.has_desc = ds.has_desc
        for name in ("customers", "articles"):
            url = join(prepared, "features", f"{name}.parquet")
            if not fs_and_path(url)[0].exists(fs_and_path(url)[1]):
                raise StreamError(f"{url}: feature table missing; run data.prepare")
        cust = read_table(join(prepared, "features", "customers.parquet"))
        art = read_table(join(prepared, "features", "articles.parquet"))
        first, last = ds.first_day, ds.last_day
        days = np.arange(first - 1, last + 400)
        self._tod = (first - 1, np.stack(features.time_of_year(days), axis=1))
        self.customer = self._dense(cust, "customer_idx", self.customer_features, self.cards["customer_id"])
        self.article = self._dense(art, "article_idx", self.article_features, self.cards["article_id"])
        if self.has_desc:  # a list array indexed by article_idx: a batch's tokens are one Arrow take
            n = self.cards["article_id"]
            lengths = np.zeros(n, dtype=np.int64)
            idx = art["article_idx"].to_numpy()
            tokens = art["desc_tokens"].combine_chunks()
            lengths[idx] = pc.list_value_length(tokens).to_numpy(zero_copy_only=False)
            order = np.argsort(idx)
            values = tokens.take(pa.array(order)).flatten() if len(order) else pa.array([], pa.int32())
            # Articles missing from the table (only the OOV row, normally) get no tokens.
            self.desc_lists = pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32)),
                                                       values.cast(pa.int32()))

    @staticmethod
    def _dense(table: pa.Table, key: str, cols: list[str], n: int) -> np.ndarray:
        """(features, ids): feature-major, so a batch's gather lands key-major as KJTs want it."""
        out = np.zeros((len(cols), n), dtype=np.int32)  # column 0 (OOV) keeps all-OOV features
        idx = table[key].to_numpy()
        for j, c in enumerate(cols):
            out[j, idx] = table[c].to_numpy()
        return out

    def time_of_year(self, day: np.ndarray) -> np.ndarray:
        """(B, 2) float32 sin/cos from a per-day table over the data's span (read-only: thread-safe)."""
        lo, table = self._tod
        if len(day) and (day.min() < lo or day.max() >= lo + len(table)):
            return np.stack(features.time_of_year(day), axis=1)
        return table[day - lo]

    def desc(self, article_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lengths and concatenated tokens of the given articles' descriptions."""
        picked = self.desc_lists.take(pa.array(article_idx))
        offsets = picked.offsets.to_numpy()
        return np.diff(offsets), picked.values.to_numpy()[offsets[0]:offsets[-1]]

    def item_keys(self) -> tuple[str, ...]:
        return ("article_id", *self.article_features, *(("desc_tokens",) if self.has_desc else ()))
