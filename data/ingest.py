"""Real data -> canonical Parquet tables (data/schema.py), streamed in bounded memory.

    python -m data.ingest data=hm data.raw_dir=/path/to/h-and-m-personalized-fashion-recommendations
    python -m data.ingest data=movielens data.raw_dir=/path/to/ml-100k
    python -m data.ingest data=movielens data.movielens_variant=ml-1m data.raw_dir=/path/to/ml-1m

Bad rows are rejected or have a bad optional value nulled, counted by reason and quoted with file and
line in ``ingest_report.json`` (written to the dataset root and the run directory). For every file,
rows read = rows written + rows rejected. Transactions whose customer or article is not in the
customers/articles tables are rejected as ``unknown_customer``/``unknown_article``.
"""

from __future__ import annotations

import logging
import time

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from omegaconf import DictConfig

from data import config as _config  # noqa: F401  (registers the structured configs)
from data.csvparse import IngestError, Report, date, integer, number, parse_columns, stream_csv, text
from data.io import ShardWriter, join, table_url, write_json, write_parquet
from data.runinfo import peak_rss_mb, start_run
from data.schema import ARTICLES, CUSTOMERS, TRANSACTIONS, UNKNOWN, Table
from data.staging import staged

log = logging.getLogger(__name__)

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western"]
ML1M_OCCUPATIONS = ["other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
                    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
                    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer"]


AGE_RANGE = (0, 150)  # years; a value outside is a bad value (nulled and counted), not an age


def _parsers_for(spec: Table) -> tuple[dict, set[str]]:
    """Column parsers derived from the canonical schema (for sources that follow it, i.e. H&M)."""
    parsers = {}
    for col in spec.columns:
        t = col.type
        if pa.types.is_date(t):
            parsers[col.name] = date()
        elif pa.types.is_integer(t):
            parsers[col.name] = integer(t, *AGE_RANGE) if col.name == "age" else integer(t)
        elif pa.types.is_floating(t):
            parsers[col.name] = number(t, lo=0.0 if col.name in ("price", "age") else None)
        else:
            parsers[col.name] = text()
    return parsers, {c.name for c in spec.columns if not c.nullable}


def _drop_duplicates(table: pa.Table, key: str, lines: np.ndarray, report: Report) -> pa.Table:
    """Keeps the first row of each key; later ones are rejected as duplicate_id (vectorised)."""
    rows = pa.array(np.arange(table.num_rows))
    first = table.select([key]).append_column("_row", rows).group_by(key).aggregate([("_row", "min")])
    keep = pc.is_in(rows, first["_row_min"]).to_numpy(zero_copy_only=False)
    dup = np.flatnonzero(~keep)
    report.reject(f"duplicate_id:{key}", lines[dup], key, table[key].take(pa.array(dup[:report.max_examples])).to_pylist())
    report.rows_written -= len(dup)
    return table.filter(pa.array(keep))


def _read_small_table(url: str, spec: Table, opts, report: Report, **csv_kw) -> tuple[pa.Table, np.ndarray]:
    """Customers and articles: parsed batch by batch, then deduplicated on the key."""
    parsers, required = _parsers_for(spec)
    parts, line_parts = [], []
    for batch, lines in stream_csv(url, spec.names, report, block_size=opts.batch_bytes, **csv_kw):
        cols, keep = parse_columns(batch, parsers, required, lines, report)
        parts.append(pa.table(cols).filter(pa.array(keep)))
        line_parts.append(lines[keep])
        report.rows_written += int(keep.sum())
    table = pa.concat_tables(parts) if parts else spec.schema.empty_table()
    lines = np.concatenate(line_parts) if line_parts else np.zeros(0, dtype=np.int64)
    table = _drop_duplicates(table, spec.key[0], lines, report)
    return table.cast(spec.schema), lines


def ingest_hm(raw_dir: str, root: str, opts) -> dict:
    reports = {}
    rep = Report(join(raw_dir, "customers.csv"), opts.max_examples)
    customers, _ = _read_small_table(rep.file, CUSTOMERS, opts, rep)
    reports["customers"] = rep
    rep = Report(join(raw_dir, "articles.csv"), opts.max_examples)
    articles, _ = _read_small_table(rep.file, ARTICLES, opts, rep)
    reports["articles"] = rep
    write_parquet(customers, table_url(root, "customers"))
    write_parquet(articles, table_url(root, "articles"))

    rep = Report(join(raw_dir, "transactions_train.csv"), opts.max_examples)
    parsers, required = _parsers_for(TRANSACTIONS)
    parsers["sales_channel_id"] = integer(pa.int8(), lo=1, hi=2)
    writer = ShardWriter(table_url(root, "transactions"), TRANSACTIONS.schema, opts.shard_rows)
    known = {"customer_id": customers["customer_id"], "article_id": articles["article_id"]}
    for batch, lines in stream_csv(rep.file, TRANSACTIONS.names, rep, block_size=opts.batch_bytes):
        cols, keep = parse_columns(batch, parsers, required, lines, rep)
        keep = _reject_unknown(cols, keep, known, lines, rep)
        writer.write(pa.table(cols).filter(pa.array(keep)).cast(TRANSACTIONS.schema))
        rep.rows_written += int(keep.sum())
    writer.close()
    reports["transactions"] = rep
    return reports


def _reject_unknown(cols: dict, keep: np.ndarray, known: dict, lines: np.ndarray, rep: Report) -> np.ndarray:
    for name, values in known.items():
        unknown = ~pc.fill_null(pc.is_in(cols[name], value_set=values), True).to_numpy(zero_copy_only=False)
        new = np.flatnonzero(unknown & keep)
        what = name.split("_")[0]
        rep.reject(f"unknown_{what}", lines[new], name, cols[name].take(pa.array(new[:rep.max_examples])).to_pylist())
        keep = keep & ~unknown
    return keep


# ---------------------------------------------------------------- MovieLens


def _fill(spec: Table, n: int, given: dict[str, pa.Array]) -> pa.Table:
    """A canonical table from the given columns; the rest take the schema's fill value."""
    arrays = [given[c.name].cast(c.type) if c.name in given
              else pa.nulls(n, c.type) if c.fill is None else pa.repeat(pa.scalar(c.fill, c.type), n)
              for c in spec.columns]
    return pa.Table.from_arrays(arrays, schema=spec.schema)


# GroupLens's CSV layout (ml-latest, ml-latest-small, ml-20m, ml-25m, ml-32m): headers, quoted titles,
# no users file (customers are the raters, without demographics). Internal name -> the file's column.
ML_CSV_VARIANTS = ("ml-latest", "ml-latest-small", "ml-20m", "ml-25m", "ml-32m")
ML_CSV_COLUMNS = {"ratings": {"user": "userId", "movie": "movieId", "rating": "rating", "ts": "timestamp"},
                  "movies": {"movie": "movieId", "title": "title", "genres": "genres"}}


def _ml_files(variant: str) -> dict:
    if variant in ML_CSV_VARIANTS:
        return {"ratings": ("ratings.csv", ",", None, list(ML_CSV_COLUMNS["ratings"]), "utf8"),
                "movies": ("movies.csv", ",", None, list(ML_CSV_COLUMNS["movies"]), "utf8"),
                "users": None}
    if variant == "ml-100k":
        return {
            "ratings": ("u.data", "\t", None, ["user", "movie", "rating", "ts"], "utf8"),
            "movies": ("u.item", "|", None, ["movie", "title", "release", "video_release", "url"]
                       + [f"g{i}" for i in range(19)], "latin1"),
            "users": ("u.user", "|", None, ["user", "age", "gender", "occupation", "zip"], "latin1"),
        }
    if variant == "ml-1m":
        return {
            "ratings": ("ratings.dat", "\x1f", "::", ["user", "movie", "rating", "ts"], "utf8"),
            "movies": ("movies.dat", "\x1f", "::", ["movie", "title", "genres"], "latin1"),
            "users": ("users.dat", "\x1f", "::", ["user", "gender", "age", "occupation", "zip"], "latin1"),
        }
    raise ValueError(f"data.movielens_variant={variant!r}: expected ml-100k, ml-1m or one of {list(ML_CSV_VARIANTS)}")


def ingest_movielens(raw_dir: str, root: str, variant: str, min_rating: int, opts) -> dict:
    files = _ml_files(variant)
    reports = {}

    csv = variant in ML_CSV_VARIANTS

    def read(kind: str, parsers: dict, required: set[str]):
        name, delim, multi, names, enc = files[kind]
        rep = Report(join(raw_dir, name), opts.max_examples)
        header = ML_CSV_COLUMNS[kind] if csv else None  # a header names the columns; else they are positional
        expected = [header[n] for n in names] if header else names
        for batch, lines in stream_csv(rep.file, expected, rep, delimiter=delim, column_names=None if header else names,
                                       encoding=enc, block_size=opts.batch_bytes, multi_char_delimiter=multi):
            batch = pa.RecordBatch.from_arrays(batch.columns, names=names) if header else batch
            cols, keep = parse_columns(batch.select(list(parsers)), parsers, required, lines, rep)
            yield rep, cols, keep, lines
        reports[kind] = rep

    if csv:
        customers = _raters(raw_dir, files, opts, reports)
    else:
        customers = _ml_users(read, variant, reports)
    articles = _ml_movies(read, variant, reports)
    write_parquet(customers, table_url(root, "customers"))
    write_parquet(articles, table_url(root, "articles"))
    _ml_ratings(read, root, customers, articles, min_rating, opts)
    return {"customers": reports["users"], "articles": reports["movies"], "transactions": reports["ratings"]}


def _raters(raw_dir: str, files: dict, opts, reports: dict) -> pa.Table:
    """Customers of a layout without a users file: every distinct user id of ratings.csv (one columnar
    pass over the user column; the ratings themselves are checked and counted in their own pass)."""
    name = files["ratings"][0]
    scratch = Report(join(raw_dir, name), 0)
    ids = []
    for batch, lines in stream_csv(scratch.file, ["userId"], scratch, delimiter=",", block_size=opts.batch_bytes):
        parsed, keep = parse_columns(batch, {"userId": integer(pa.int64(), lo=0)}, {"userId"}, lines, scratch)
        ids.append(pc.unique(parsed["userId"].filter(pa.array(keep))))
    users = pc.unique(pa.chunked_array(ids, pa.int64()).combine_chunks()) if ids else pa.array([], pa.int64())
    users = pc.cast(users.take(pc.sort_indices(users)), pa.string())
    rep = Report(f"{scratch.file} (raters; no users file in this layout)", opts.max_examples)
    rep.rows_read = rep.rows_written = len(users)
    reports["users"] = rep
    return _fill(CUSTOMERS, len(users), {"customer_id": users})


def _ml_users(read, variant: str, reports: dict) -> pa.Table:
    parts = []
    user_parsers = {"user": integer(pa.int64(), lo=0), "age": integer(pa.int16(), *AGE_RANGE), "gender": text(),
                    "occupation": text() if variant == "ml-100k" else integer(pa.int64(), 0, 20), "zip": text()}
    for rep, c, keep, lines in read("users", user_parsers, {"user"}):
        occupation = c["occupation"]
        if variant == "ml-1m":  # a code there; names as in ml-1m's README
            occupation = pa.array(ML1M_OCCUPATIONS).take(occupation)
        t = pa.table({"customer_id": pc.cast(c["user"], pa.string()), "age": c["age"],
                      "club_member_status": c["gender"], "fashion_news_frequency": occupation,
                      "postal_code": c["zip"]}).filter(pa.array(keep))
        parts.append((t, lines[keep]))
        rep.rows_written += int(keep.sum())
    users = pa.concat_tables([p[0] for p in parts])
    users = _drop_duplicates(users, "customer_id", np.concatenate([p[1] for p in parts]), reports["users"])
    return _fill(CUSTOMERS, users.num_rows, {k: users[k] for k in users.column_names})


def _ml_movies(read, variant: str, reports: dict) -> pa.Table:
    parts = []
    if variant == "ml-100k":
        movie_parsers = {"movie": integer(pa.int64(), lo=0), "title": text()}
        movie_parsers.update({f"g{i}": integer(pa.int8(), 0, 1) for i in range(19)})
    else:
        movie_parsers = {"movie": integer(pa.int64(), lo=0), "title": text(), "genres": text()}
    for rep, c, keep, lines in read("movies", movie_parsers, {"movie"}):
        if variant == "ml-100k":
            genres = pc.binary_join_element_wise(
                *[pc.if_else(pc.equal(c[f"g{i}"], 1), g, pa.scalar(None, pa.string()))
                  for i, g in enumerate(ML100K_GENRES)], "|", null_handling="skip")
        else:
            genres = c["genres"]
        genres = pc.if_else(pc.equal(pc.fill_null(genres, ""), ""), UNKNOWN, genres)
        title = pc.fill_null(c["title"], UNKNOWN)
        year = pc.extract_regex(title, r"\((?P<y>\d{4})\)\s*$").field("y")
        decade = pc.binary_join_element_wise(pc.utf8_slice_codeunits(year, 0, 3), "0s", "")
        t = pa.table({
            "article_id": c["movie"], "product_code": c["movie"], "prod_name": title,
            "product_type_name": pc.list_element(pc.split_pattern(genres, "|"), 0),
            "product_group_name": genres,
            "section_name": pc.fill_null(decade, UNKNOWN),
            "detail_desc": pc.binary_join_element_wise(title, pc.replace_substring(genres, "|", " "), ". "),
        }).filter(pa.array(keep))
        parts.append((t, lines[keep]))
        rep.rows_written += int(keep.sum())
    movies = pa.concat_tables([p[0] for p in parts])
    movies = _drop_duplicates(movies, "article_id", np.concatenate([p[1] for p in parts]), reports["movies"])
    return _fill(ARTICLES, movies.num_rows, {k: movies[k] for k in movies.column_names})


def _ml_ratings(read, root: str, customers: pa.Table, articles: pa.Table, min_rating: int, opts) -> None:
    writer = ShardWriter(table_url(root, "transactions"), TRANSACTIONS.schema, opts.shard_rows)
    known = {"customer_id": customers["customer_id"], "article_id": articles["article_id"]}
    rating_parsers = {"user": integer(pa.int64(), lo=0), "movie": integer(pa.int64(), lo=0),
                      "rating": number(pa.float32(), lo=0.0), "ts": integer(pa.int64(), lo=0)}
    for rep, c, keep, lines in read("ratings", rating_parsers, set(rating_parsers)):
        cols = {"customer_id": pc.cast(c["user"], pa.string()), "article_id": c["movie"]}
        keep = _reject_unknown(cols, keep, known, lines, rep)
        low = np.flatnonzero(keep & pc.fill_null(pc.less(c["rating"], float(min_rating)), False)
                             .to_numpy(zero_copy_only=False))
        rep.reject("below_min_rating", lines[low], "rating")
        keep[low] = False
        n = len(keep)
        t = _fill(TRANSACTIONS, n, {
            "t_dat": pc.cast(pc.cast(c["ts"], pa.timestamp("s")), pa.date32()),
            "customer_id": cols["customer_id"], "article_id": cols["article_id"],
            "price": pc.divide(pc.cast(c["rating"], pa.float32()), 5.0),
        }).filter(pa.array(keep))
        writer.write(t)
        rep.rows_written += int(keep.sum())
    writer.close()


def ingest(data_cfg, opts) -> dict:
    t0 = time.perf_counter()
    if not data_cfg.raw_dir:
        raise IngestError(f"data={data_cfg.name}: set data.raw_dir to the folder with the raw files")
    if data_cfg.source not in ("hm", "movielens"):
        raise IngestError(f"data={data_cfg.name} has source={data_cfg.source!r}; ingest reads hm or movielens "
                          "(synthetic presets are made by data.synth)")
    # Written aside and published whole (data/staging.py): a killed ingest leaves the previous dataset.
    with staged(data_cfg.root, "ingest_report.json") as out:
        if data_cfg.source == "hm":
            reports = ingest_hm(data_cfg.raw_dir, out, opts)
        else:
            reports = ingest_movielens(data_cfg.raw_dir, out, data_cfg.movielens_variant,
                                       data_cfg.movielens_min_rating, opts)
        for rep in reports.values():
            rep.check()
        summary = {"source": data_cfg.source, "root": data_cfg.root, "seconds": round(time.perf_counter() - t0, 2),
                   "peak_rss_mb": peak_rss_mb(), "tables": {k: r.as_dict() for k, r in reports.items()}}
        write_json(summary, join(out, "ingest_report.json"))
    return summary


@hydra.main(config_path="../conf", config_name="ingest", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    run_dir = start_run(cfg)
    summary = ingest(cfg.data, cfg.ingest)
    write_json(summary, join(run_dir, "ingest_report.json"))
    for name, r in summary["tables"].items():
        log.info("%-12s read %d, written %d, rejected %d %s", name, r["rows_read"], r["rows_written"],
                 r["rows_rejected"], r["rejected_by_reason"] or "")
    return summary


if __name__ == "__main__":
    main()
