"""The data contract: canonical tables every stage reads and writes.

Three tables, as in the H&M "Personalized Fashion Recommendations" data:

* ``transactions`` (sharded Parquet under ``<root>/transactions/``): one row per article bought.
* ``customers`` (``<root>/customers.parquet``): one row per customer.
* ``articles`` (``<root>/articles.parquet``): one row per article, all 25 H&M columns.

Identifier conventions
    ``article_id`` is an int64 (H&M writes it with a leading zero, ``0108775015``; the canonical form
    is the integer, and :func:`format_article_id` gives back the 10-digit text used in submissions).
    ``customer_id`` is a string (the 64-hex-digit H&M id, or the decimal MovieLens user id).

Sources that lack a column fill it with :attr:`Column.fill`; :data:`MOVIELENS_MAPPING` documents how
MovieLens fields land in H&M-shaped slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    nullable: bool = False
    fill: Any = None  # value used when a source has no such column (None = null)
    doc: str = ""

    @property
    def field(self) -> pa.Field:
        return pa.field(self.name, self.type, nullable=self.nullable)


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...] = ()

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([c.field for c in self.columns])

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"table {self.name!r} has no column {name!r}")


UNKNOWN = "unknown"

TRANSACTIONS = Table(
    "transactions",
    (
        Column("t_dat", pa.date32(), doc="day of purchase"),
        Column("customer_id", pa.string(), doc="customer key"),
        Column("article_id", pa.int64(), doc="article key"),
        Column("price", pa.float32(), fill=0.0, doc="price paid, H&M-normalised; finite and >= 0"),
        Column("sales_channel_id", pa.int8(), fill=1, doc="1 = store, 2 = online"),
    ),
)

CUSTOMERS = Table(
    "customers",
    (
        Column("customer_id", pa.string()),
        Column("FN", pa.float32(), nullable=True, doc="1.0 when subscribed to fashion news, else null"),
        Column("Active", pa.float32(), nullable=True, doc="1.0 when active for communication, else null"),
        Column("club_member_status", pa.string(), nullable=True, doc="ACTIVE, PRE-CREATE, LEFT CLUB"),
        Column("fashion_news_frequency", pa.string(), nullable=True, doc="NONE, Regularly, Monthly"),
        Column("age", pa.int16(), nullable=True),
        Column("postal_code", pa.string(), nullable=True, doc="hashed postal code"),
    ),
    key=("customer_id",),
)

_ART_INT = pa.int32()
ARTICLES = Table(
    "articles",
    (
        Column("article_id", pa.int64()),
        Column("product_code", _ART_INT, fill=-1, doc="article_id // 1000 in H&M"),
        Column("prod_name", pa.string(), nullable=True, fill=UNKNOWN),
        Column("product_type_no", _ART_INT, fill=-1),
        Column("product_type_name", pa.string(), nullable=True, fill=UNKNOWN),
        Column("product_group_name", pa.string(), nullable=True, fill=UNKNOWN),
        Column("graphical_appearance_no", _ART_INT, fill=-1),
        Column("graphical_appearance_name", pa.string(), nullable=True, fill=UNKNOWN),
        Column("colour_group_code", _ART_INT, fill=-1),
        Column("colour_group_name", pa.string(), nullable=True, fill=UNKNOWN),
        Column("perceived_colour_value_id", _ART_INT, fill=-1),
        Column("perceived_colour_value_name", pa.string(), nullable=True, fill=UNKNOWN),
        Column("perceived_colour_master_id", _ART_INT, fill=-1),
        Column("perceived_colour_master_name", pa.string(), nullable=True, fill=UNKNOWN),
        Column("department_no", _ART_INT, fill=-1),
        Column("department_name", pa.string(), nullable=True, fill=UNKNOWN),
        Column("index_code", pa.string(), nullable=True, fill=UNKNOWN),
        Column("index_name", pa.string(), nullable=True, fill=UNKNOWN),
        Column("index_group_no", _ART_INT, fill=-1),
        Column("index_group_name", pa.string(), nullable=True, fill=UNKNOWN),
        Column("section_no", _ART_INT, fill=-1),
        Column("section_name", pa.string(), nullable=True, fill=UNKNOWN),
        Column("garment_group_no", _ART_INT, fill=-1),
        Column("garment_group_name", pa.string(), nullable=True, fill=UNKNOWN),
        Column("detail_desc", pa.string(), nullable=True, fill=None),
    ),
    key=("article_id",),
)

TABLES = {t.name: t for t in (TRANSACTIONS, CUSTOMERS, ARTICLES)}

# How MovieLens fields land in the canonical tables (users -> customers, movies -> articles,
# ratings -> transactions). Everything not named here takes its column's ``fill``.
MOVIELENS_MAPPING = {
    "transactions": {
        "t_dat": "rating timestamp (UTC day)",
        "customer_id": "user id (decimal text)",
        "article_id": "movie id",
        "price": "rating / 5 (ML has no price; keeps the column meaningful and positive)",
        "sales_channel_id": "fill 1",
    },
    "customers": {
        "age": "age (ml-1m: bucket lower bound 1/18/25/...; ml-100k: years)",
        "club_member_status": "gender (M/F)",
        "fashion_news_frequency": "occupation (name in ml-100k, code in ml-1m)",
        "postal_code": "zip code",
        "FN/Active": "null",
    },
    "articles": {
        "prod_name": "title",
        "product_code": "movie id",
        "product_type_name": "first genre",
        "product_group_name": "all genres joined by '|'",
        "section_name": "release decade, e.g. 1990s",
        "detail_desc": "title and genres",
    },
}


def format_article_id(article_id: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The 10-digit, zero-padded text form H&M uses (0108775015)."""
    return pc.utf8_lpad(pc.cast(article_id, pa.string()), 10, "0")


class SchemaError(ValueError):
    """A table does not match the data contract; the message names the file and column."""


def conform(table: pa.Table, spec: Table, where: str) -> pa.Table:
    """Checks ``table`` against ``spec`` and returns it with canonical column order and types.

    Missing columns and lossy or impossible type changes raise :class:`SchemaError` naming ``where``
    (usually a file) and the column. Dictionary-encoded strings are decoded. Extra columns are dropped.
    """
    missing = [n for n in spec.names if n not in table.column_names]
    if missing:
        raise SchemaError(f"{where}: missing column(s) {missing} for table {spec.name!r}; "
                          f"found {table.column_names}")
    arrays = []
    for col in spec.columns:
        arr = table.column(col.name)
        if pa.types.is_dictionary(arr.type):
            arr = arr.cast(arr.type.value_type)
        if not arr.type.equals(col.type):
            if not _castable(arr.type, col.type):
                raise SchemaError(f"{where}: column {col.name!r} has type {arr.type}, expected {col.type}")
            try:
                arr = arr.cast(col.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SchemaError(f"{where}: column {col.name!r} cannot be read as {col.type}: {e}") from e
        if not col.nullable and arr.null_count:
            first = pc.index(pc.is_null(arr), True).as_py()
            raise SchemaError(f"{where}: column {col.name!r} has {arr.null_count} null(s), first at row {first}")
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=spec.schema)


def _castable(src: pa.DataType, dst: pa.DataType) -> bool:
    """Type changes ``conform`` accepts: within integers, integer/float to float, string flavours,
    timestamps to dates. Anything else (text to number, say) is a schema error, not a silent parse."""
    t = pa.types
    if t.is_null(src):  # an all-null column; the null check that follows decides
        return True
    if t.is_integer(dst):
        return t.is_integer(src)
    if t.is_floating(dst):
        return t.is_integer(src) or t.is_floating(src)
    if t.is_string(dst) or t.is_large_string(dst):
        return t.is_string(src) or t.is_large_string(src)
    if t.is_date(dst):
        return t.is_date(src) or t.is_timestamp(src)
    return False
