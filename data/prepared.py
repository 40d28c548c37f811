"""The prepared dataset as one typed contract: what ``data.prepare`` wrote (``manifest.json``), read in one
place and handed to every part that trains on it, embeds from it or serves it.

    ds = Prepared.read("datasets/small/prepared")
    ds.n_articles, ds.cardinalities["postal_code"], ds.first_day, ds.version, ds.lineage

A dataset's vocabularies carry a version (a digest of every vocabulary's values in index order) and a
lineage: the versions of the datasets it grew from, oldest first, then its own. A prepared dataset grown
from a parent (``prepare.parent``) keeps every row of the parent's vocabularies, so a model trained on any
dataset of the lineage can be continued on it (``trainer.init_from``).

The manifest's other entries stay readable by key (``ds["eval"]``): the contract names what the trainer
relies on, the report keeps the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from data.io import fs_and_path, join, read_json

MANIFEST = "manifest.json"


class PreparedError(FileNotFoundError):
    pass


def day_number(text: str) -> int:
    """Days since 1970-01-01 of an ISO date."""
    return int(np.datetime64(text, "D").astype(np.int64))


@dataclass(frozen=True)
class Lineage:
    """Vocabulary versions oldest first, this dataset's last (empty: prepared before lineages existed)."""

    versions: tuple[str, ...] = ()
    sizes: tuple[dict, ...] = ()  # each version's vocabulary sizes (rows, the OOV row included)
    # the day (since 1970-01-01) each version's new rows entered the shop: its parent's last day + 1 (None:
    # the first version, or not recorded)
    listed_from: tuple[int | None, ...] = ()

    @classmethod
    def from_manifest(cls, entries: list | None) -> "Lineage":
        entries = entries or []
        return cls(tuple(e["version"] for e in entries), tuple(dict(e.get("sizes", {})) for e in entries),
                   tuple(e.get("listed_from") for e in entries))

    @property
    def version(self) -> str | None:
        return self.versions[-1] if self.versions else None

    def contains(self, version: str | None) -> bool:
        return version is not None and version in self.versions

    def to_json(self) -> list[dict]:
        listed = self.listed_from or (None,) * len(self.versions)
        return [{"version": v, "sizes": s, **({"listed_from": d} if d is not None else {})}
                for v, s, d in zip(self.versions, self.sizes, listed)]


@dataclass(frozen=True)
class Prepared(Mapping):
    """See the module docstring. ``raw`` is the manifest as written; the fields are what the code reads."""

    url: str
    root: str  # the canonical tables it was prepared from
    cardinalities: dict[str, int]  # embedding rows per feature (OOV row included)
    customer_features: tuple[str, ...]
    article_features: tuple[str, ...]  # with "desc_tokens" when descriptions are tokenised
    history_len: int
    history_within_day: bool
    history_order: str  # time: histories are the latest purchases; none: order means nothing (a random sample)
    first_day: int  # days since 1970-01-01 of the first and last transaction kept
    last_day: int
    protocol: str
    lineage: Lineage
    parent: dict | None  # {"prepared": url, "version": ...} when grown from a parent
    raw: dict = field(repr=False)

    @classmethod
    def read(cls, url: str) -> "Prepared":
        path = join(url, MANIFEST)
        fs, p = fs_and_path(path)
        if not fs.exists(p):
            raise PreparedError(f"{path}: no prepared dataset here; run data.prepare first")
        return cls.from_manifest(url, read_json(path))

    @classmethod
    def from_manifest(cls, url: str, manifest: dict) -> "Prepared":
        if isinstance(manifest, Prepared):
            return manifest
        try:
            split = manifest["split"]
            return cls(
                url=url, root=manifest["root"],
                cardinalities={k: int(v) for k, v in manifest["cardinalities"].items()},
                customer_features=tuple(manifest["customer_features"]),
                article_features=tuple(manifest["article_features"]),
                history_len=int(manifest["history_len"]),
                history_within_day=bool(manifest.get("history_within_day", False)),
                history_order=str(manifest.get("history_order", "time")),
                first_day=day_number(split["first_day"]), last_day=day_number(split["last_day"]),
                protocol=str(split.get("protocol", "week")),
                lineage=Lineage.from_manifest(manifest.get("lineage")),
                parent=manifest.get("parent"), raw=manifest)
        except KeyError as e:
            raise PreparedError(f"{join(url, MANIFEST)}: missing entry {e}; prepare the data again") from None

    # ------------------------------------------------------------ what the parts read

    @property
    def n_articles(self) -> int:
        """Rows of the article table (row 0 the OOV bucket)."""
        return self.cardinalities["article_id"]

    @property
    def n_customers(self) -> int:
        return self.cardinalities["customer_id"]

    @property
    def version(self) -> str | None:
        return self.lineage.version

    def parent_rows(self, feature: str) -> int | None:
        """Rows of ``feature``'s vocabulary the previous version of the lineage already held (the rows
        above were listed by this version: this week's new articles); None without a previous version."""
        if len(self.lineage.sizes) < 2:
            return None
        rows = self.lineage.sizes[-2].get(feature)
        return None if rows is None else int(rows)

    def listing_days(self, feature: str = "article_id") -> np.ndarray:
        """(rows,) int64 the day each row of ``feature``'s vocabulary entered the shop, as the lineage knows
        it (the version that added the row: its ``listed_from``); -1 for the first version's rows and
        where not recorded."""
        out = np.full(self.cardinalities[feature], -1, np.int64)
        listed = self.lineage.listed_from or (None,) * len(self.lineage.sizes)
        for j in range(1, len(self.lineage.sizes)):
            lo, hi = self.lineage.sizes[j - 1].get(feature), self.lineage.sizes[j].get(feature)
            if listed[j] is not None and lo is not None and hi is not None:
                out[lo:hi] = int(listed[j])
        return out

    @property
    def has_desc(self) -> bool:
        return "desc_tokens" in self.article_features

    # ------------------------------------------------------------ the rest of the manifest, by key

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)
