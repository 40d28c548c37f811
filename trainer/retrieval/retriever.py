"""The model's rankings for validation, evaluate and recommend: the ranker (trainer/retrieval/ranker.py, the one
ranking the serving bundle shares) over item vectors and buying-again terms taken from a model in memory
(:meth:`Retriever.from_embedder`: validation, recommend) or from an export (:meth:`Retriever.from_export`:
evaluate), with the index stage's FAISS index when given.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from data.io import fs_and_path, join, read_json, read_table
from data.jagged import Jagged
from data.staging import output_of
from trainer.retrieval import ivf as ix
from trainer.retrieval.ranker import BuyingAgain, Queries, Ranker


class IndexSearch:
    """A FAISS index whose rows are articles: searched at its nprobe, answering article rows (-1: none)."""

    def __init__(self, index_dir: str, item_ids: np.ndarray, article_ids: np.ndarray):
        index, index_article_ids = ix.load(index_dir)
        self.nprobe = int(read_json(join(output_of(index_dir), "index_report.json"))["nprobe"])
        self.index = ix.for_search(index, self.nprobe)
        order = np.argsort(article_ids, kind="stable")  # raw article id -> article row
        at = np.clip(np.searchsorted(article_ids[order], index_article_ids), 0, len(order) - 1)
        if not np.array_equal(article_ids[order][at], index_article_ids):
            raise ValueError(f"{index_dir}: the index holds articles the model does not know; build it again")
        self.rows = item_ids[order][at]

    def search(self, queries: np.ndarray, width: int) -> np.ndarray:
        found = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), width)[1]
        return np.where(found >= 0, self.rows[np.clip(found, 0, None)], -1)


class Retriever:
    def __init__(self, items: torch.Tensor | np.ndarray, buying_again: BuyingAgain | None = None,
                 index: IndexSearch | None = None, exclude: np.ndarray | None = None):
        """``items``: (rows, D) scoring vectors by article row (row 0: the OOV bucket, never returned;
        ``exclude``: further rows never returned, e.g. articles an export does not hold)."""
        self.index = index
        self.ranker = Ranker(items, buying_again, index.search if index is not None else None, exclude)
        self.items, self.buying_again = self.ranker.items, self.ranker.buying_again

    @property
    def how(self) -> str:
        search = f"IVF (nprobe {self.index.nprobe})" if self.index is not None else "exact"
        if self.buying_again is None:
            return search
        kind = "mixture" if self.buying_again.temperature is not None else "bonus"
        return f"{search} + buying again ({len(self.buying_again.bonus)} positions, {kind})"

    def buys_again(self, seen) -> bool:
        return self.ranker.buys_again(seen)

    def items_np(self) -> np.ndarray:
        return self.ranker.items_np()

    # ------------------------------------------------------------ sources

    @classmethod
    def from_embedder(cls, embedder, items: torch.Tensor | None = None, index_dir: str | None = None) -> "Retriever":
        """From a model in memory (``items``: its :meth:`Embedder.items`, computed when not given; every
        rank of a distributed job takes part in that)."""
        items = embedder.items() if items is None else items
        bonus = embedder.repeat_bonus()
        buying = None
        if bonus is not None:
            buying = BuyingAgain(bonus, embedder.temperature if embedder.repeat_mixture() else None)
        index = None
        if index_dir is not None:
            from data import vocab

            article_ids = np.r_[-1, vocab.load(embedder.prepared, "article_id")["value"].to_numpy()]
            index = IndexSearch(index_dir, np.arange(len(article_ids)), article_ids)
        return cls(items, buying, index)

    @classmethod
    def from_export(cls, export_dir: str, index_dir: str | None = None) -> "Retriever":
        """From the export stage's item vectors and scoring terms (and the index stage's index)."""
        out = output_of(export_dir)
        report = read_json(join(out, "export_report.json"))
        item_idx, vectors = ix.read_embeddings(join(out, "items.parquet"), "article_idx")
        by_row = np.zeros((int(item_idx.max()) + 1, vectors.shape[1]), np.float32)
        by_row[item_idx] = vectors
        absent = np.setdiff1d(np.arange(len(by_row)), item_idx)
        bonus = np.asarray(report.get("repeat_bonus") or [], np.float32)
        mode = report.get("repeat_mode") or ("mixture" if "repeat_level" in pq.read_schema(
            fs_and_path(join(out, "users_val.parquet"))[1]).names else "bonus")  # exports before repeat_mode
        buying = BuyingAgain(bonus, report.get("temperature") if mode == "mixture" else None) if len(bonus) else None
        index = None
        if index_dir is not None and ix.exists(index_dir):
            ix.check_matches(index_dir, report.get("fingerprint"), report.get("step"))
            article_ids = read_table(join(out, "items.parquet"))["article_id"].to_numpy()
            index = IndexSearch(index_dir, item_idx, article_ids)
        return cls(by_row, buying, index, exclude=absent)

    # ------------------------------------------------------------ ranking

    def rank(self, queries: Queries, k: int, seen: Jagged | None = None, recent: Jagged | None = None) -> np.ndarray:
        """(n, k) article rows, best first (-1 past the catalogue): :meth:`Ranker.top_k`."""
        return self.ranker.top_k(queries, k, seen, recent)

    def top_k(self, queries: torch.Tensor | np.ndarray, k: int, seen: Jagged | None = None, recent: Jagged | None = None,
              levels: np.ndarray | None = None) -> np.ndarray:
        """(n, k) article rows, best first (-1 past the catalogue): :meth:`Ranker.top_k` of the queries'
        vectors and buying-again ``levels``."""
        return self.ranker.top_k(Queries(queries, levels), k, seen, recent)
