from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.io import read_table, write_parquet
from data.schema import ARTICLES, CUSTOMERS, TRANSACTIONS, SchemaError, conform, format_article_id


def tx_table(**override) -> pa.Table:
    cols = {
        "t_dat": pa.array([dt.date(2020, 9, 1), dt.date(2020, 9, 2)]),
        "customer_id": pa.array(["a", "b"]),
        "article_id": pa.array([108775015, 7], pa.int64()),
        "price": pa.array([0.05, 0.01], pa.float32()),
        "sales_channel_id": pa.array([1, 2], pa.int8()),
    }
    cols.update(override)
    return pa.table(cols)


def test_articles_has_all_25_hm_columns():
    assert len(ARTICLES.names) == 25
    assert ARTICLES.names[0] == "article_id" and ARTICLES.names[-1] == "detail_desc"
    assert CUSTOMERS.names == ["customer_id", "FN", "Active", "club_member_status", "fashion_news_frequency",
                               "age", "postal_code"]
    assert TRANSACTIONS.names == ["t_dat", "customer_id", "article_id", "price", "sales_channel_id"]


@pytest.mark.parametrize("url_kind", ["local", "memory"])
def test_parquet_round_trip(tmp_path, url_kind):
    url = str(tmp_path / "t.parquet") if url_kind == "local" else "memory://schema-test/t.parquet"
    t = conform(tx_table(), TRANSACTIONS, "test")
    write_parquet(t, url)
    back = read_table(url, TRANSACTIONS)
    assert back.equals(t)
    assert back.schema.equals(TRANSACTIONS.schema)


def test_conform_reorders_casts_and_decodes_dictionary():
    t = tx_table(article_id=pa.array([1, 2], pa.int32()), customer_id=pa.array(["a", "b"]).dictionary_encode(),
                 price=pa.array([1, 2], pa.int64()))
    t = t.select(list(reversed(t.column_names))).append_column("extra", pa.array([0, 0]))
    out = conform(t, TRANSACTIONS, "x.parquet")
    assert out.column_names == TRANSACTIONS.names
    assert out["customer_id"].type == pa.string() and out["price"].to_pylist() == [1.0, 2.0]


def test_conform_errors_name_where_and_column():
    with pytest.raises(SchemaError, match=r"f.parquet: missing column\(s\) \['price'\]"):
        conform(tx_table().drop(["price"]), TRANSACTIONS, "f.parquet")
    with pytest.raises(SchemaError, match="f.parquet: column 'price' has type string"):
        conform(tx_table(price=pa.array(["1", "2"])), TRANSACTIONS, "f.parquet")
    with pytest.raises(SchemaError, match="column 'customer_id' has 1 null.*row 1"):
        conform(tx_table(customer_id=pa.array(["a", None])), TRANSACTIONS, "f.parquet")
    with pytest.raises(SchemaError, match="column 'sales_channel_id' cannot be read as int8"):
        conform(tx_table(sales_channel_id=pa.array([1, 1000])), TRANSACTIONS, "f.parquet")


def test_nullable_columns_accept_nulls(tmp_path):
    t = pa.table({"customer_id": ["a"], "FN": pa.array([None], pa.float32()), "Active": pa.array([None], pa.float32()),
                  "club_member_status": [None], "fashion_news_frequency": ["NONE"],
                  "age": pa.array([None], pa.int16()), "postal_code": ["x"]})
    out = conform(t, CUSTOMERS, "c")
    pq.write_table(out, tmp_path / "c.parquet")
    assert conform(pq.read_table(tmp_path / "c.parquet"), CUSTOMERS, "c").equals(out)


def test_format_article_id_pads_to_ten_digits():
    assert format_article_id(pa.array([108775015, 959461001], pa.int64())).to_pylist() == ["0108775015", "0959461001"]
