from __future__ import annotations

import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import C1, C2, C3, TX_HEADER, write_hm_fixture
from omegaconf import OmegaConf

from data.config import DataConfig, IngestOptions
from data.csvparse import IngestError
from data.ingest import ingest
from data.io import read_articles, read_customers, read_table
from data.schema import TRANSACTIONS, SchemaError, format_article_id


def run_ingest(raw: pathlib.Path, out: pathlib.Path, source="hm", batch_bytes=64 << 20, **data_kw) -> dict:
    data = OmegaConf.structured(DataConfig(name="t", source=source, root=str(out), raw_dir=str(raw), **data_kw))
    return ingest(data, OmegaConf.structured(IngestOptions(batch_bytes=batch_bytes)))


@pytest.mark.parametrize("batch_bytes", [64 << 20, 600])  # one block, and many tiny blocks
def test_hm_fixture_counts_and_reasons(tmp_path, batch_bytes):
    expected = write_hm_fixture(tmp_path / "raw")
    summary = run_ingest(tmp_path / "raw", tmp_path / "out", batch_bytes=batch_bytes)
    for name, exp in expected.items():
        got = summary["tables"][name]
        assert got["rows_read"] == exp["read"], name
        assert got["rows_written"] == exp["written"], name
        assert got["rows_read"] == got["rows_written"] + got["rows_rejected"]
        assert got["rejected_by_reason"] == exp["rejected"], name
        assert got["values_set_to_null"] == exp.get("nulled", {}), name


def test_hm_rejections_name_file_line_and_column(tmp_path):
    write_hm_fixture(tmp_path / "raw")
    summary = run_ingest(tmp_path / "raw", tmp_path / "out", batch_bytes=600)
    ex = {(e["reason"], e["line"]) for e in summary["tables"]["transactions"]["examples"]}
    # Lines from the fixture's comments (header = line 1).
    assert {("bad_date:t_dat", 5), ("bad_number:price", 6), ("bad_number:price", 7), ("unknown_article", 8),
            ("unknown_customer", 9), ("malformed_row", 10), ("missing_value:price", 11),
            ("bad_integer:sales_channel_id", 12), ("invalid_utf8:customer_id", 14)} <= ex
    files = {e["file"] for e in summary["tables"]["transactions"]["examples"]}
    assert files == {str(tmp_path / "raw" / "transactions_train.csv")}
    cust_ex = {(e["reason"], e["line"], e.get("column")) for e in summary["tables"]["customers"]["examples"]}
    assert ("duplicate_id:customer_id", 5, "customer_id") in cust_ex
    assert ("bad_integer:age (set to null)", 6, "age") in cust_ex


def test_hm_output_values(tmp_path):
    write_hm_fixture(tmp_path / "raw")
    run_ingest(tmp_path / "raw", tmp_path / "out")
    tx = read_table(str(tmp_path / "out" / "transactions"), TRANSACTIONS)
    assert tx.schema.equals(TRANSACTIONS.schema)
    rows = tx.to_pylist()
    assert [(r["customer_id"], r["article_id"], r["sales_channel_id"]) for r in rows] == [
        (C1, 108775015, 2), (C1, 108775044, 2), (C2, 110065001, 1), (C3, 108775015, 2)]
    assert str(rows[0]["t_dat"]) == "2018-09-20"
    assert rows[0]["price"] == pytest.approx(0.0508305084745762, rel=1e-6)
    # article_id keeps H&M's leading-zero text form when formatted back.
    assert format_article_id(tx["article_id"]).to_pylist()[0] == "0108775015"
    arts = read_articles(str(tmp_path / "out"))
    assert arts.column("detail_desc").to_pylist()[1] == "Top, with straps, in soft jersey."
    assert arts.column("prod_name").to_pylist()[2] == "Väst"
    assert arts.column("colour_group_code").to_pylist() == [9, 9, 9]
    cust = read_customers(str(tmp_path / "out"))
    by_id = {r["customer_id"]: r for r in cust.to_pylist()}
    assert by_id[C1]["age"] == 49 and by_id[C1]["postal_code"] == "52043ee2162cf5aa"  # first of the duplicates
    assert by_id[C2]["FN"] == 1.0 and by_id[C3]["age"] is None
    assert by_id["d" * 64]["age"] is None and by_id["f" * 64]["postal_code"] is None


def test_missing_column_is_named(tmp_path):
    write_hm_fixture(tmp_path / "raw")
    (tmp_path / "raw" / "transactions_train.csv").write_text("t_dat,customer_id,article_id,sales_channel_id\n"
                                                             f"2018-09-20,{C1},0108775015,2\n")
    with pytest.raises(SchemaError, match=r"transactions_train.csv: missing column\(s\) \['price'\]"):
        run_ingest(tmp_path / "raw", tmp_path / "out")


@pytest.mark.parametrize("content", [b"", TX_HEADER.encode() + b"\n"])
def test_empty_file_is_an_error(tmp_path, content):
    write_hm_fixture(tmp_path / "raw")
    (tmp_path / "raw" / "transactions_train.csv").write_bytes(content)
    with pytest.raises(IngestError, match="transactions_train.csv: .*(empty|no data rows)"):
        run_ingest(tmp_path / "raw", tmp_path / "out")


def test_missing_file_is_an_error(tmp_path):
    write_hm_fixture(tmp_path / "raw")
    (tmp_path / "raw" / "articles.csv").unlink()
    with pytest.raises(IngestError, match="articles.csv: file not found"):
        run_ingest(tmp_path / "raw", tmp_path / "out")


# ---------------------------------------------------------------- MovieLens

ML100K_ITEM = [
    "1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0",
    "2|GoldenEye (1995)|01-Jan-1995||http://x|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0",
    "3|Misérables, Les (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|1|0",
]


def write_ml100k(folder: pathlib.Path) -> None:
    folder.mkdir(parents=True)
    (folder / "u.data").write_text("196\t1\t3\t881250949\n186\t2\t5\t891717742\n196\t3\t4\t878887116\n"
                                   "22\t1\t1\t878887116\n196\t99\t4\t878887116\n196\tx\t4\t878887116\n")
    (folder / "u.item").write_bytes("\n".join(ML100K_ITEM).encode("latin-1") + b"\n")
    (folder / "u.user").write_text("196|49|M|writer|55105\n186|39|F|executive|00000\n22|25|M|writer|40206\n")


def test_movielens_100k(tmp_path):
    write_ml100k(tmp_path / "ml")
    summary = run_ingest(tmp_path / "ml", tmp_path / "out", source="movielens")
    r = summary["tables"]["transactions"]
    assert (r["rows_read"], r["rows_written"]) == (6, 4)
    assert r["rejected_by_reason"] == {"unknown_article": 1, "bad_integer:movie": 1}
    arts = {a["article_id"]: a for a in read_articles(str(tmp_path / "out")).to_pylist()}
    assert arts[1]["prod_name"] == "Toy Story (1995)"
    assert arts[1]["product_group_name"] == "Animation|Children's|Comedy"
    assert arts[1]["product_type_name"] == "Animation"
    assert arts[2]["section_name"] == "1990s"
    assert arts[3]["prod_name"] == "Misérables, Les (1995)"  # latin-1 decoded
    assert arts[3]["garment_group_name"] == "unknown" and arts[3]["department_no"] == -1  # schema fill
    cust = {c["customer_id"]: c for c in read_customers(str(tmp_path / "out")).to_pylist()}
    assert cust["196"]["age"] == 49 and cust["196"]["club_member_status"] == "M"
    assert cust["186"]["fashion_news_frequency"] == "executive" and cust["186"]["postal_code"] == "00000"
    tx = pq.read_table(str(tmp_path / "out" / "transactions")).to_pylist()
    first = tx[0]
    assert (first["customer_id"], first["article_id"], str(first["t_dat"])) == ("196", 1, "1997-12-04")
    assert first["price"] == pytest.approx(0.6)


def test_movielens_first_genre_and_decade_become_features(tmp_path):
    """prepare's product_type and section vocabularies keep MovieLens's first genre and decade apart
    (its numbered columns are all -1)."""
    from conftest import prepare_options
    from omegaconf import OmegaConf

    from data import vocab
    from data.config import DataConfig, SplitConfig
    from data.prepare import prepare

    write_ml100k(tmp_path / "ml")
    run_ingest(tmp_path / "ml", tmp_path / "out", source="movielens")
    prepare(OmegaConf.structured(DataConfig(name="ml", root=str(tmp_path / "out"))),
            OmegaConf.structured(SplitConfig(protocol="leave_last_n")), prepare_options(str(tmp_path / "p")),
            progress=False)
    types = vocab.load(str(tmp_path / "p"), "product_type")["value"].to_pylist()
    assert sorted(v.split("|")[1] for v in types) == ["Action", "Animation", "Drama"]
    sections = vocab.load(str(tmp_path / "p"), "section")["value"].to_pylist()
    assert [v.split("|")[1] for v in sections] == ["1990s"]


def test_movielens_1m_double_colon_and_min_rating(tmp_path):
    d = tmp_path / "ml1m"
    d.mkdir()
    # Separators straddle the reader's chunk boundary often enough with many rows.
    ratings = "".join(f"{1 + i % 3}::{1 + i % 2}::{1 + i % 5}::97830{i % 10000:04d}\n" for i in range(5000))
    (d / "ratings.dat").write_text(ratings)
    (d / "movies.dat").write_bytes("1::Toy Story (1995)::Animation|Children's|Comedy\n"
                                   "2::Café Society (1995)::Drama\n".encode("latin-1"))
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n")
    summary = run_ingest(d, tmp_path / "out", source="movielens", movielens_variant="ml-1m",
                         movielens_min_rating=4)
    r = summary["tables"]["transactions"]
    assert r["rows_read"] == 5000
    assert r["rejected_by_reason"] == {"below_min_rating": 3000}  # ratings 1..3 of 1..5
    assert r["rows_written"] == 2000
    arts = {a["article_id"]: a for a in read_articles(str(tmp_path / "out")).to_pylist()}
    assert arts[2]["prod_name"] == "Café Society (1995)" and arts[1]["product_type_name"] == "Animation"
    cust = {c["customer_id"]: c for c in read_customers(str(tmp_path / "out")).to_pylist()}
    assert cust["1"]["fashion_news_frequency"] == "K-12 student" and cust["2"]["age"] == 56
    tx = pq.read_table(str(tmp_path / "out" / "transactions"))
    assert sorted(pa.compute.unique(tx["price"]).to_pylist()) == pytest.approx([0.8, 1.0])


def test_raw_dir_required_for_real_data(tmp_path):
    data = OmegaConf.structured(DataConfig(name="hm", source="hm", root=str(tmp_path)))
    with pytest.raises(IngestError, match="set data.raw_dir"):
        ingest(data, OmegaConf.structured(IngestOptions()))


@pytest.mark.parametrize("batch_bytes", [64 << 20, 200])
def test_movielens_csv_layout_without_users(tmp_path, batch_bytes):
    """GroupLens's CSV layout (ml-latest, ml-25m, ml-32m): headers, quoted titles with commas, genres
    joined by '|', no users file: the customers are the raters."""
    raw = tmp_path / "ml"
    raw.mkdir()
    (raw / "movies.csv").write_text('movieId,title,genres\n1,Toy Story (1995),Adventure|Animation|Children\n'
                                    '2,"American President, The (1995)",Comedy|Drama|Romance\n'
                                    '3,Heat (1995),(no genres listed)\n')
    (raw / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,4.5,964981247\n"
                                     "7,2,3.0,964982224\nx,1,4.0,964982703\n7,99,5.0,964983815\n12,3,2.5,964982931\n")
    summary = run_ingest(raw, tmp_path / "out", source="movielens", movielens_variant="ml-latest-small",
                         batch_bytes=batch_bytes)
    r = summary["tables"]["transactions"]
    assert (r["rows_read"], r["rows_written"]) == (6, 4)
    assert r["rejected_by_reason"] == {"bad_integer:user": 1, "unknown_article": 1}
    assert sorted(read_customers(str(tmp_path / "out"))["customer_id"].to_pylist()) == ["1", "12", "7"]
    arts = {a["article_id"]: a for a in read_articles(str(tmp_path / "out")).to_pylist()}
    assert arts[2]["prod_name"] == "American President, The (1995)" and arts[2]["product_type_name"] == "Comedy"
    assert arts[1]["section_name"] == "1990s"
