"""The CSV reader on files in the real formats, with blocks small enough that every boundary is crossed.

Each case checks the verdict (kept, rejected by reason on the right line, or a clear error) and that
rows read = rows written + rows rejected.
"""

from __future__ import annotations

import csv
import io
import pathlib
import random

import numpy as np
import pyarrow as pa
import pytest
from conftest import ART_HEADER, C1, C2, C3, TX_HEADER, article_row, write_hm_fixture
from test_ingest import run_ingest

from data.csvparse import Report, date, integer, number, parse_columns, stream_csv

SMALL_BLOCKS = [7, 13, 64, 1 << 20]  # bytes per read: most rows straddle a block at the small sizes


def read_all(path: pathlib.Path, expected: list[str], block_size: int, **kw) -> tuple[list[dict], list[int], Report]:
    report = Report(str(path))
    rows, lines = [], []
    for batch, ln in stream_csv(str(path), expected, report, block_size=block_size, **kw):
        rows += batch.to_pylist()
        lines += ln.tolist()
    return rows, lines, report


def python_csv_lines(text: str) -> list[tuple[int, list[str]]]:
    """Reference: Python's csv module, with the line each record starts on (blank lines skipped)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    out, start = [], 1
    for rec in reader:
        if rec:
            out.append((start, rec))
        start = reader.line_num + 1
    return out


@pytest.mark.parametrize("block_size", SMALL_BLOCKS)
def test_quoted_newlines_and_blank_lines_keep_every_line_number(tmp_path, block_size):
    text = ('a,b,c\n1,"two\nlines",x\n\n2,plain,y\n\r\n3,"three\n\nlines, with a comma",z\n'
            '4,"say ""hi""\nthen",w\n5,short\n6,"ok",v\n\n')
    path = tmp_path / "f.csv"
    path.write_bytes(text.encode())
    rows, lines, report = read_all(path, ["a", "b", "c"], block_size)
    reference = python_csv_lines(text)[1:]  # the header is the first record
    good = [(ln, rec) for ln, rec in reference if len(rec) == 3]
    assert [(ln, [r["a"].decode(), r["b"].decode(), r["c"].decode()]) for ln, r in zip(lines, rows)] == good
    assert report.rejected == {"malformed_row": 1}
    assert [e["line"] for e in report.examples] == [ln for ln, rec in reference if len(rec) != 3] == [12]
    assert report.rows_read == len(rows) + report.rows_rejected == 6


def lines_alone(text: str, numbers: list[int]) -> list[tuple[int, list[str]]]:
    """Reference for records that must not merge: each of these file lines read alone by Python's csv
    module in strict mode."""
    physical = text.split("\n")
    return [(n, next(csv.reader([physical[n - 1]], strict=True))) for n in numbers]


def accepted(rows, lines, names) -> list[tuple[int, list[str]]]:
    return [(ln, [r[c].decode() for c in names]) for ln, r in zip(lines, rows)]


BROKEN_QUOTING = {
    # a stray quote opens a field; the next record's quoted field closes it (a close followed by text)
    "closed by a later field": ('a,b,c\n1,"foo,x\n2,bar,"q"\n3,ok,z\n', {2}, [3, 4]),
    # a closing quote followed by something other than the separator or the end of the record
    "text after a close": ('a,b,c\n1,"ab"cd,z\n2,"e""f",g\n', {2}, [3]),
    # the stray quote would swallow a whole record and close at a line end; the closing line opens its own
    # field that stays open to the end of the file
    "swallowing whole records": ('a,b,c\n1,"foo,x\n2,bar,baz\n3,abc,"\n4,ok,z\n', {2, 4}, [3, 5]),
    # open to the end of the file
    "never closed": ('a,b\n0,ok\n1,"x\ny\n3,4\n5,6', {3}, [2, 5, 6]),
}


@pytest.mark.parametrize("block_size", range(3, 48))
@pytest.mark.parametrize("shape", sorted(BROKEN_QUOTING))
def test_broken_quoting_is_rejected_by_line_and_never_merges_records(tmp_path, shape, block_size):
    text, bad_lines, good_lines = BROKEN_QUOTING[shape]
    path = tmp_path / "f.csv"
    path.write_text(text)
    names = text.split("\n")[0].split(",")
    rows, lines, report = read_all(path, names, block_size)
    assert accepted(rows, lines, names) == lines_alone(text, good_lines)
    assert {e["line"] for e in report.examples if e["reason"] == "malformed_quoting"} == bad_lines
    assert report.rejected["malformed_quoting"] == len(bad_lines)
    physical = [ln for ln in text.split("\n")[1:] if ln]  # every record of the file's own lines
    assert report.rows_read == len(physical) == len(rows) + report.rows_rejected


@pytest.mark.parametrize("seed", range(30))
def test_random_stray_quotes_lose_no_record(tmp_path, seed):
    """Well-formed records (some with quoted separators and escaped quotes) with stray quotes thrown in:
    every line is one record, and every accepted row is its line read alone."""
    rng = random.Random(seed)
    body, strays = [], set()
    for i in range(60):
        fields = [str(i), rng.choice(['plain', '"a,b"', '"say ""hi"""', '""', 'x y']), rng.choice(["1", '"2"'])]
        if rng.random() < 0.15:
            k = rng.randrange(1, 3)
            fields[k] = rng.choice(['"', '"open', 'cl"', '"x"y']) + fields[k].strip('"')
            strays.add(i)
        body.append(",".join(fields))
    text = "a,b,c\n" + "\n".join(body) + "\n"
    path = tmp_path / "f.csv"
    path.write_text(text)
    rows, lines, report = read_all(path, ["a", "b", "c"], rng.choice([5, 17, 64, 1 << 20]))
    assert report.rows_read == len(body) == len(rows) + report.rows_rejected
    assert accepted(rows, lines, ["a", "b", "c"]) == lines_alone(text, lines)  # none merged
    clean = [i + 2 for i in range(len(body)) if i not in strays]
    assert set(clean) <= set(lines)  # a line without a stray quote is never lost with a neighbour


def test_a_quote_inside_an_unquoted_field_is_a_character(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text('a,b\n1,ab"c\n2,d\n')
    rows, lines, _ = read_all(path, ["a", "b"], 4)
    assert [(r["b"], ln) for r, ln in zip(rows, lines)] == [(b'ab"c', 2), (b"d", 3)]


@pytest.mark.parametrize("block_size", range(5, 40))
def test_double_colon_separator_at_every_block_boundary(tmp_path, block_size):
    """ml-1m's '::' separator, with a block ending after each byte of the file in turn."""
    path = tmp_path / "ratings.dat"
    path.write_text("1::10::5::978300760\n2::20::4::978302109\n\n3::30::3::978301968\n")
    rows, lines, report = read_all(path, ["user", "movie", "rating", "ts"], block_size, delimiter="\x1f",
                                   column_names=["user", "movie", "rating", "ts"], multi_char_delimiter="::")
    assert report.rejected == {}
    assert [(r["user"], r["movie"], r["ts"]) for r in rows] == [
        (b"1", b"10", b"978300760"), (b"2", b"20", b"978302109"), (b"3", b"30", b"978301968")]
    assert lines == [1, 2, 4]


def test_extra_columns_are_reported(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text("a,b,comment\n1,2,x\n")
    rows, _, report = read_all(path, ["a", "b"], 1 << 20)
    assert rows == [{"a": b"1", "b": b"2"}]
    assert report.as_dict()["columns_ignored"] == ["comment"]


def parse_one(parser, values: list) -> tuple[list, list]:
    arr, bad, _ = parser(pa.array([None if v is None else v.encode() for v in values], pa.binary()))
    return arr.to_pylist(), bad.tolist()


def test_numbers_with_blanks_and_plus_signs_are_kept():
    vals, bad = parse_one(number(pa.float64()), [" 0.5", "0.5 ", "+0.25", " -1e2 "])
    assert vals == [0.5, 0.5, 0.25, -100.0] and bad == [False] * 4
    vals, bad = parse_one(integer(pa.int8(), lo=1, hi=2), ["+2", " 1", "1 ", " +1.0 ", "+3"])
    assert vals == [2, 1, 1, 1, None] and bad == [False, False, False, False, True]


def test_numbers_too_big_for_their_type_are_bad_not_infinite():
    vals, bad = parse_one(number(pa.float32()), ["1e999", "1e300", "-1e39", "3e38", "1e-999"])
    assert bad == [True, True, True, False, False]
    assert vals[:3] == [None, None, None] and np.isfinite(vals[3]) and vals[4] == 0.0
    vals, bad = parse_one(number(pa.float64()), ["1e300", "1e999"])
    assert vals[0] == 1e300 and bad == [False, True]


def test_impossible_dates_are_bad_not_rolled_over():
    vals, bad = parse_one(date(), ["2018-02-30", "2018-02-28", "2020-02-29", "2019-02-29", " 2018-09-20 ",
                                   "2018-9-2", "2018-04-31"])
    assert bad == [True, False, False, True, False, False, True]
    assert [str(v) if v else None for v in vals] == [None, "2018-02-28", "2020-02-29", None, "2018-09-20",
                                                     "2018-09-02", None]


def test_parse_columns_rejects_with_the_line_given():
    report = Report("f.csv")
    batch = pa.RecordBatch.from_pydict({"p": pa.array([b"1", b"1e999", b"2"], pa.binary())})
    _, keep = parse_columns(batch, {"p": number()}, {"p"}, np.array([2, 5, 9]), report)
    assert keep.tolist() == [True, False, True]
    assert report.examples == [{"file": "f.csv", "line": 5, "reason": "bad_number:p", "column": "p",
                                "value": "1e999"}]


# ---------------------------------------------------------------- through ingest, H&M format


@pytest.mark.parametrize("batch_bytes", [61, 1 << 20])
def test_hm_ingest_real_format_edge_cases(tmp_path, batch_bytes):
    raw = tmp_path / "raw"
    write_hm_fixture(raw)
    (raw / "customers.csv").write_text("\n".join([
        "customer_id,FN,Active,club_member_status,fashion_news_frequency,age,postal_code,signup_note",
        f"{C1},,,ACTIVE,NONE, 49 ,p1,x",  # 2 ok, blanks around the age
        "",  # 3 blank
        f"{C2},1.0,1.0,ACTIVE,Regularly,-3,p2,y",  # 4 negative age -> nulled
        f"{C3},,,PRE-CREATE,NONE,+31,p3,z",  # 5 ok, +31
    ]) + "\n")
    desc = '"Soft top,\nwith a ""quoted"" word\nover three lines."'
    (raw / "articles.csv").write_text("\n".join([
        ART_HEADER,
        article_row("0108775015", desc=desc),  # 2-4
        "",  # 5 blank
        article_row("0108775044"),  # 6
        article_row("0110065001", desc=desc),  # 7-9
        article_row("01100x5002"),  # 10 bad id
    ]) + "\n")
    (raw / "transactions_train.csv").write_text("\n".join([
        TX_HEADER,
        f"2018-09-20,{C1},0108775015, 0.05 ,+2",  # 2 ok
        f"2018-02-30,{C1},0108775015,0.05,2",  # 3 impossible date
        "",  # 4 blank
        f"2018-09-21,{C2},0108775044,1e999,1",  # 5 infinite price
        f"2018-09-21,{C2},0108775044,1e300,1",  # 6 too big for float32
        f"2018-09-22,{C3},0110065001,0.07 ,1",  # 7 ok
    ]) + "\n")
    summary = run_ingest(raw, tmp_path / "out", batch_bytes=batch_bytes)
    t = summary["tables"]
    cust = t["customers"]
    assert (cust["rows_read"], cust["rows_written"], cust["rows_rejected"]) == (3, 3, 0)
    assert cust["values_set_to_null"] == {"bad_integer:age": 1}
    assert [(e["line"], e["value"]) for e in cust["examples"]] == [(4, "-3")]
    assert cust["columns_ignored"] == ["signup_note"]
    arts = t["articles"]
    assert (arts["rows_read"], arts["rows_written"]) == (4, 3)
    assert [(e["reason"], e["line"]) for e in arts["examples"]] == [("bad_integer:article_id", 10)]
    tx = t["transactions"]
    assert (tx["rows_read"], tx["rows_written"]) == (5, 2)
    assert tx["rejected_by_reason"] == {"bad_date:t_dat": 1, "bad_number:price": 2}
    assert sorted((e["reason"], e["line"]) for e in tx["examples"]) == [
        ("bad_date:t_dat", 3), ("bad_number:price", 5), ("bad_number:price", 6)]
    from data.io import read_articles, read_customers, read_table

    ages = {r["customer_id"]: r["age"] for r in read_customers(str(tmp_path / "out")).to_pylist()}
    assert ages == {C1: 49, C2: None, C3: 31}
    descs = read_articles(str(tmp_path / "out")).column("detail_desc").to_pylist()
    assert descs[0] == 'Soft top,\nwith a "quoted" word\nover three lines.' == descs[2]
    rows = read_table(str(tmp_path / "out" / "transactions")).to_pylist()
    assert [(r["sales_channel_id"], round(r["price"], 4)) for r in rows] == [(2, 0.05), (1, 0.07)]


@pytest.mark.parametrize("batch_bytes", [64 << 20, 600])
def test_a_stray_quote_in_articles_loses_only_its_own_article(tmp_path, batch_bytes):
    """An opening quote in one article's text and a quoted text in the next: read as one record they
    would make one accepted article with a garbage description and lose the second without a count."""
    raw = tmp_path / "raw"
    write_hm_fixture(raw)
    (raw / "articles.csv").write_text("\n".join([
        ART_HEADER,
        article_row("0108775015", desc='"Soft top with a stray quote'),  # 2: the quote never closes well
        article_row("0108775044", desc='"Jersey, with a ""quoted"" word"'),  # 3
        article_row("0110065001"),  # 4
    ]) + "\n")
    arts = run_ingest(raw, tmp_path / "out", batch_bytes=batch_bytes)["tables"]["articles"]
    assert (arts["rows_read"], arts["rows_written"], arts["rows_rejected"]) == (3, 2, 1)
    assert [(e["reason"], e["line"]) for e in arts["examples"]] == [("malformed_quoting", 2)]
    from data.io import read_articles

    kept = read_articles(str(tmp_path / "out")).to_pylist()
    assert [(r["article_id"], r["detail_desc"]) for r in kept] == [
        (108775044, 'Jersey, with a "quoted" word'), (110065001, "Jersey top with narrow shoulder straps.")]
