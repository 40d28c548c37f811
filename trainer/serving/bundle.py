"""A serving bundle loaded for answering (trainer/bundle.py writes one): torch, faiss, pyarrow and numpy
only, no training code, no Hydra, no TorchRec.

    bundle = Bundle.load("runs/small/bundle/output")
    answer = bundle.recommend(customer_ids=["00a1..."], k=12)            # known customers
    answer = bundle.recommend(histories=[[706016001, 372860001]], k=12)  # an ad-hoc history, oldest first

Scoring is the ranker evaluation measured (trainer/retrieval/ranker.py): the query tower's vector against every
article's scoring vector (exact, or the FAISS IVF index at the bundle's nprobe), the customer's bought
articles left out (``exclude_seen``; by default the run's ``data.exclude_seen``), else the customer's own
last articles rescored by the buying-again term. A customer the bundle does not know, or one without purchases, gets the popular articles of the
bundle's last week (``cold_start`` says so).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from dataclasses import dataclass, field

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from data import catalogue
from data.jagged import Jagged
from trainer.retrieval.ranker import BuyingAgain, Queries, Ranker
from trainer.retrieval.rerank import padded

MANIFEST = "manifest.json"
FORMAT = 2  # 2: item vectors held by the index only; bought articles as ``older`` beside ``history``


class BundleError(ValueError):
    """A bundle that is not whole, or a request it cannot answer."""


def id_bytes(ids: pa.Array) -> np.ndarray:
    """Raw ids as numpy fixed-width bytes, for sorting and binary search: a view of Arrow's buffer when
    every id has one width (H&M's hex ids), else one pass through Python."""
    ids = ids.cast(pa.binary())
    if ids.null_count:
        raise BundleError(f"{ids.null_count} customer ids are null")
    offsets = np.frombuffer(ids.buffers()[1], np.int32)[ids.offset:ids.offset + len(ids) + 1]
    widths = np.diff(offsets)
    if len(ids) and (widths == widths[0]).all() and widths[0] > 0:
        return np.frombuffer(ids.buffers()[2], f"S{widths[0]}", count=len(ids), offset=int(offsets[0]))
    return np.array(ids.to_pylist(), dtype=bytes)


def item_vectors(index) -> np.ndarray:
    """(articles + 1, d) the articles' scoring vectors, as the IVF-Flat index stores them (exactly), with
    row 0, the OOV row, zero: a bundle keeps them once."""
    if not isinstance(index, faiss.IndexIVFFlat):
        raise BundleError(f"the bundle's index is {type(index).__name__}; the item vectors need an IVF-Flat index")
    index.make_direct_map()
    return np.r_[np.zeros((1, index.d), np.float32), index.reconstruct_n(0, index.ntotal)]


@dataclass
class Answer:
    """Recommendations for a batch of queries: article ids and scores per query, best first."""

    article_ids: list[list[int]]
    scores: list[list[float]]  # the inner product (NaN for a cold-start list)
    cold_start: list[bool]  # the popular articles (unknown customer, or no history)
    unknown_articles: list[int]  # per query: history entries the bundle does not know, ignored
    fingerprint: str
    extra: dict = field(default_factory=dict)


class Bundle:
    def __init__(self, path: str, manifest: dict, tower, customers: pa.Table, items: pa.Table, index):
        self.path, self.manifest = path, manifest
        self.tower = tower
        self.fingerprint = manifest["fingerprint"]
        self.digest = bundle_digest(manifest)  # this bundle's files: two bundles of one run differ here
        self.customer_ids = customers["customer_id"]  # row 0: the unknown customer (null)
        ids = id_bytes(self.customer_ids.combine_chunks()[1:])  # raw id -> row: a binary search over them sorted
        self._id_order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._id_order]
        del ids
        self.history = Jagged.from_arrow(customers["history"])  # int32 as stored: half the memory of int64
        self.older = Jagged.from_arrow(customers["older"])  # bought before the day, not in ``history``
        names = manifest["tower"]["features"]
        self.features = (np.stack([customers[n].to_numpy() for n in names]) if names
                         else np.zeros((0, customers.num_rows), np.int32))
        self.items = item_vectors(index)  # row 0 (the OOV row, never returned): zeros
        self._items_t = torch.from_numpy(self.items)  # exact search
        self.article_ids = items["article_id"].to_numpy()
        self.titles = items["title"].to_pylist()  # by article row
        # the rows the query tower has: articles added after training are recommended, not read in histories
        self.tower_articles = len(self.article_ids) - int((manifest.get("catalogue") or {}).get("added", 0))
        order = np.argsort(self.article_ids[1:], kind="stable")
        self._sorted_articles, self._article_rows = self.article_ids[1:][order], order + 1
        self.index = index
        self.index.nprobe = int(manifest["index"]["nprobe"])
        self.width = int(manifest["tower"]["history_width"])
        self.time = np.asarray(manifest["tower"]["time"], np.float32)
        again = manifest["scoring"]["buying_again"]
        self.bonus = np.asarray(again["bonus"], np.float32) if again else None
        self.temperature = again["temperature"] if again and again["mixture"] else None
        self.popular = np.asarray(manifest["popular"], np.int64)
        self._cold_list()
        self.exclude_seen = bool(manifest["exclude_seen"])  # what a request that does not say gets
        self._rankers()

    # ------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str, verify: bool = True) -> "Bundle":
        """The bundle in directory ``path``; with ``verify`` every file's size and SHA-256 are checked
        against the manifest first (a partial or altered bundle is refused, naming the file)."""
        try:
            with open(os.path.join(path, MANIFEST)) as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise BundleError(f"{path}: no readable {MANIFEST}; not a bundle, or not a whole one ({e})") from e
        if manifest.get("format") != FORMAT:
            raise BundleError(f"{path}: bundle format {manifest.get('format')!r}; this code reads format {FORMAT} "
                              "(rebuild it with python -m trainer.bundle)")
        listed = manifest.get("files")
        if not isinstance(listed, dict) or not listed:
            raise BundleError(f"{path}/{MANIFEST}: no list of the bundle's files")
        for name in listed:
            if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                raise BundleError(f"{path}/{MANIFEST}: file entry {name!r} is not a file of the bundle's directory")
        present = {n for n in os.listdir(path) if n != MANIFEST}
        unlisted = sorted(present - set(listed))
        if unlisted:
            raise BundleError(f"{path}: {unlisted} not listed in the manifest; not a bundle as written")
        for name, want in listed.items():
            file = os.path.join(path, name)
            if not os.path.exists(file) or os.path.getsize(file) != want["bytes"]:
                raise BundleError(f"{file}: missing or not the size the manifest records ({want['bytes']} bytes)")
            if verify and file_sha256(file) != want["sha256"]:
                raise BundleError(f"{file}: checksum differs from the manifest's; the bundle is damaged")
        program = os.path.join(path, "query_tower.pt2")
        check_program(program)
        tower = torch.export.load(program).module()
        customers = pq.read_table(os.path.join(path, "customers.parquet"))
        items = pq.read_table(os.path.join(path, "items.parquet"))
        index = faiss.read_index(os.path.join(path, "index.faiss"))
        return cls(path, manifest, tower, customers, items, index)

    # ------------------------------------------------------------ answering

    @property
    def id_width(self) -> int:
        """The longest customer id the bundle holds, in bytes."""
        return int(self._sorted_ids.dtype.itemsize) if len(self._sorted_ids) else 0

    def id_problem(self, customer_id: str) -> str | None:
        """Why a raw customer id cannot be one of the bundle's (None: it can)."""
        try:
            raw = str(customer_id).encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid text (an unpaired surrogate)"
        if b"\x00" in raw:
            return "holds a NUL character"
        if len(raw) > self.id_width:
            return f"of {len(raw)} bytes is longer than any customer id the bundle holds ({self.id_width} bytes)"
        return None

    def customer_rows(self, customer_ids) -> np.ndarray:
        """Rows of raw customer ids (0: unknown): a binary search over the sorted ids (no per-call hashing
        of the whole vocabulary). An id that cannot be one of the bundle's (:meth:`id_problem`) is unknown
        without being compared, so no request costs more than the stored ids' width."""
        customer_ids = list(customer_ids)
        ok = np.array([self.id_problem(c) is None for c in customer_ids], bool)
        out = np.zeros(len(customer_ids), np.int64)
        if not len(self._sorted_ids) or not ok.any():
            return out
        ids = np.asarray([str(c).encode() for c, good in zip(customer_ids, ok) if good], dtype=self._sorted_ids.dtype)
        at = np.clip(np.searchsorted(self._sorted_ids, ids), 0, len(self._sorted_ids) - 1)
        out[ok] = np.where(self._sorted_ids[at] == ids, self._id_order[at] + 1, 0)
        return out

    def article_rows(self, article_ids: np.ndarray) -> np.ndarray:
        """Rows of raw article ids (0: unknown)."""
        article_ids = np.asarray(article_ids, np.int64)
        at = np.clip(np.searchsorted(self._sorted_articles, article_ids), 0, max(len(self._sorted_articles) - 1, 0))
        known = len(self._sorted_articles) > 0
        hit = (self._sorted_articles[at] == article_ids) if known else np.zeros(len(article_ids), bool)
        return np.where(hit, self._article_rows[at] if known else 0, 0)

    # ------------------------------------------------------------ articles added after training

    def _catalogue(self):
        """The item tower program and the article feature vocabularies (loaded on first use)."""
        if getattr(self, "_item_tower", None) is None:
            info = self.manifest.get("catalogue")
            if not info:
                raise BundleError(f"{self.path}: the bundle has no item tower; rebuild it to add articles")
            program = os.path.join(self.path, "item_tower.pt2")
            check_program(program)
            self._item_tower = torch.export.load(program).module()
            self._article_vocab = pq.read_table(os.path.join(self.path, "article_vocab.parquet"))
        return self._item_tower, self._article_vocab

    @torch.no_grad()
    def place_articles(self, articles: pa.Table) -> np.ndarray:
        """(n, d) scoring vectors of catalogue rows (the articles table's columns: data/schema.py) placed by
        their features alone, as the model scores an article it never trained on: the item tower with the
        OOV id (trainer/model/cold.py), then the recent-sales column of an article not sold yet."""
        tower, vocab = self._catalogue()
        info = self.manifest["catalogue"]
        feats = []
        for name in info["features"]:
            cols = info["columns"][name]
            missing = [c for c in ([cols] if isinstance(cols, str) else cols) if c not in articles.column_names]
            if missing:
                raise BundleError(f"new articles: column(s) {missing} missing (the feature {name!r} reads them)")
            values = catalogue.article_column(articles, name) if not isinstance(cols, str) else articles[cols]
            known = vocab.filter(pc.equal(vocab["feature"], name)).select(["value"])  # in index order: 1, 2, ...
            idx, _ = catalogue.lookup(pc.cast(values, pa.string()), known)  # 0: a value training never saw
            feats.append(idx)
        features = np.stack(feats, 1).astype(np.int64) if feats else np.zeros((articles.num_rows, 0), np.int64)
        desc = info.get("desc")
        if desc:
            lists = catalogue.desc_tokens(articles["detail_desc"], desc["buckets"], desc["max_tokens"])
            tokens = Jagged.from_arrow(lists)
            width = max(int(tokens.lengths().max(initial=0)), 1)
            p = np.arange(width)
            values = np.r_[np.asarray(tokens.values, np.int64), 0]
            at = tokens.offsets[:-1, None] + p[None, :]
            grid = np.where(p[None, :] < tokens.lengths()[:, None], values[np.clip(at, 0, len(values) - 1)], 0)
            lengths = tokens.lengths().astype(np.int64)
        else:
            grid, lengths = np.zeros((articles.num_rows, 1), np.int64), np.zeros(articles.num_rows, np.int64)
        vectors = tower(torch.from_numpy(features), torch.from_numpy(grid.astype(np.int64)),
                        torch.from_numpy(lengths)).numpy()
        if info.get("new_article_score") is not None:
            vectors = np.c_[vectors, np.full(len(vectors), info["new_article_score"], np.float32)]
        return vectors.astype(np.float32)

    def _cold_list(self) -> None:
        """The cold-start ranking of every article: the last week's best sellers, then the rest in row order."""
        rest = np.setdiff1d(np.arange(1, len(self.article_ids)), self.popular)
        self.cold_list = np.r_[self.popular, rest].astype(np.int64)

    def add_articles(self, articles: pa.Table) -> int:
        """Appends the catalogue rows whose article_id the bundle does not know (placed by
        :meth:`place_articles`) to its articles and index; returns how many. In memory: trainer/bundle.py
        ``add_articles`` writes them into a new bundle."""
        ids = articles["article_id"].to_numpy(zero_copy_only=False).astype(np.int64)
        fresh = np.flatnonzero(self.article_rows(ids) == 0)
        _, first = np.unique(ids[fresh], return_index=True)  # an id given twice: its first row
        fresh = fresh[np.sort(first)]
        if not len(fresh):
            return 0
        rows = articles.take(pa.array(fresh))
        vectors = self.place_articles(rows)
        self.index.add(vectors)  # index row i is article row i + 1: appended in order
        self.items = np.r_[self.items, vectors]
        self._items_t = torch.from_numpy(self.items)
        self._rankers()
        self.article_ids = np.r_[self.article_ids, ids[fresh]]
        titles = rows["prod_name"].to_pylist() if "prod_name" in rows.column_names else [None] * len(fresh)
        self.titles = self.titles + titles
        order = np.argsort(self.article_ids[1:], kind="stable")
        self._sorted_articles, self._article_rows = self.article_ids[1:][order], order + 1
        self._cold_list()
        return int(len(fresh))

    def title(self, article_id: int) -> str | None:
        row = int(self.article_rows(np.array([article_id]))[0])
        return self.titles[row] if row else None

    @torch.no_grad()
    def queries(self, rows: np.ndarray, history: Jagged) -> tuple[np.ndarray, np.ndarray]:
        """(scoring vectors, buying-again levels) of customer rows with these histories (oldest first). An
        article added after training is left out of a history: the query tower has no row for it."""
        if len(history.values) and int(history.values.max()) >= self.tower_articles:
            keep = np.asarray(history.values) < self.tower_articles
            history = Jagged.from_lengths(np.bincount(history.owners()[keep], minlength=len(history)),
                                          history.values[keep])
        hist, lengths = padded(history, self.width)
        feats = (self.features[:, rows].T if len(self.features) else np.zeros((len(rows), 0))).astype(np.int64)
        q, level = self.tower(torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(np.ascontiguousarray(feats)),
                              torch.from_numpy(hist), torch.from_numpy(lengths),
                              torch.from_numpy(np.tile(self.time, (len(rows), 1))))
        return q.numpy(), level.numpy()

    def seen(self, rows: np.ndarray) -> Jagged:
        """Every article the customers of ``rows`` bought before the bundle's day (their history's too)."""
        return self.history.take(rows).append_rows(self.older.take(rows))

    def recommend(self, customer_ids=None, histories=None, k: int = 12, exclude_seen: bool | None = None,
                  exact: bool = False) -> Answer:
        """Top-k articles for known customers (``customer_ids``: their history and bought articles as of
        the bundle's day) or for ad-hoc ``histories`` (lists of raw article ids, oldest first; unknown ones
        are ignored and counted). ``exclude_seen``: leave bought articles out (None: the bundle's default,
        the run's ``data.exclude_seen``). ``exact``: score every article instead of searching the IVF index."""
        if exclude_seen is None:
            exclude_seen = self.exclude_seen
        if (customer_ids is None) == (histories is None):
            raise BundleError("give customer_ids or histories, not both")
        n_articles = len(self.article_ids) - 1
        if not 1 <= k <= n_articles:
            raise BundleError(f"k={k}: must be between 1 and the catalogue's {n_articles} articles")
        if customer_ids is not None:
            rows = self.customer_rows(customer_ids)
            history, seen = self.history.take(rows), self.seen(rows)
            unknown = [0] * len(rows)
            cold = (rows == 0) | (history.lengths() == 0)
        else:
            raw = Jagged.from_lists(histories)
            mapped = self.article_rows(raw.values)
            known = mapped > 0
            unknown = np.bincount(raw.owners()[~known], minlength=len(raw)).tolist()
            history = Jagged.from_lengths(np.bincount(raw.owners()[known], minlength=len(raw)), mapped[known])
            seen, rows = history, np.zeros(len(raw), np.int64)
            cold = history.lengths() == 0
        ranked = np.tile(self.cold_list[:k], (len(rows), 1))  # a cold start at any k: the same list, longer
        scores = np.full((len(rows), k), np.nan, np.float32)
        warm = np.flatnonzero(~cold)
        if len(warm):
            q, levels = self.queries(rows[warm], history.take(warm))
            top = self.top_k(q, k, seen.take(warm) if exclude_seen else None,
                             None if exclude_seen else history.take(warm), levels, exact)
            ranked[warm] = np.clip(top, 0, None)
            scores[warm] = np.where(top >= 0, np.einsum("nd,nkd->nk", q, self.items[np.clip(top, 0, None)]), np.nan)
        return Answer([self.article_ids[r].tolist() for r in ranked], [s.tolist() for s in scores],
                      cold.tolist(), unknown, self.fingerprint)

    def top_k(self, q: np.ndarray, k: int, seen: Jagged | None = None, recent: Jagged | None = None,
              levels: np.ndarray | None = None, exact: bool = False) -> np.ndarray:
        """(n, k) article rows (-1: none) for scoring vectors ``q``: the one ranking evaluation measured
        (trainer/retrieval/ranker.py), through the bundle's index or exactly. ``seen``: rows left out; else
        ``recent`` (oldest first) is rescored by the buying-again term with the queries' ``levels``."""
        ranker = self._exact if exact else self._indexed
        return ranker.top_k(Queries(q, levels), k, seen, recent)

    def _search(self, q: np.ndarray, width: int) -> np.ndarray:
        """The index's rows for the queries: index row i is article row i + 1 (-1: none)."""
        found = self.index.search(q, max(1, min(width, self.index.ntotal)))[1]
        rows = np.where(found >= 0, found + 1, -1)
        return np.pad(rows, ((0, 0), (0, width - rows.shape[1])), constant_values=-1) if rows.shape[1] < width \
            else rows

    def _rankers(self) -> None:
        again = BuyingAgain(self.bonus, self.temperature) if self.bonus is not None else None
        self._exact = Ranker(self._items_t, again, device=torch.device("cpu"))
        self._indexed = Ranker(self._items_t, again, search=self._search)


# What a query tower archive may hold (below its top folder): plain tensors, JSON, and sample inputs
# that load with weights_only. Anything else (tensor subclasses, custom or opaque objects, compiled
# AOTInductor code) torch.export.load would unpickle or run.
PROGRAM_ENTRIES = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                             r"|models/\w+\.json|data/weights/(weight_\d+|\w+_weights_config\.json)"
                             r"|data/constants/(tensor_\d+|\w+_constants_config\.json)|data/sample_inputs/\w+\.pt)")


def check_program(path: str) -> None:
    """Refuses a ``torch.export`` archive that loading would unpickle anything from.

    torch.export.load unpickles tensor subclasses and custom objects, and retries sample inputs with an
    unrestricted unpickler; a bundle's own program holds none of them (its tables are plain tensors), so
    one that does was not written by trainer.bundle and is refused before torch sees it."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise BundleError(f"{path}: not a torch.export archive ({e})") from e
    with archive:
        for name in archive.namelist():
            entry = name.split("/", 1)[1] if "/" in name else name
            if name.endswith("/") or not entry:
                continue
            if not PROGRAM_ENTRIES.fullmatch(entry):
                raise BundleError(f"{path}: entry {name!r} is not part of a bundle's query tower; refused unloaded")
            if entry.endswith("_config.json"):
                for key, meta in json.loads(archive.read(name)).get("config", {}).items():
                    if meta.get("use_pickle") or not re.fullmatch(r"(weight|tensor)_\d+", meta.get("path_name", "")):
                        raise BundleError(f"{path}: {key!r} in {name} is a pickled object; refused unloaded")
            elif entry.startswith("data/sample_inputs/"):
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception as e:  # noqa: BLE001  (any failure: not plain tensors)
                    raise BundleError(f"{path}: {name} is not plain tensors ({type(e).__name__}); refused unloaded") \
                        from e


def bundle_digest(manifest: dict) -> str:
    """A digest of the bundle's files (each one's name and SHA-256, as its manifest lists them)."""
    files = manifest.get("files") or {}
    text = ";".join(f"{name}:{files[name].get('sha256')}" for name in sorted(files))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
