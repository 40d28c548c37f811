"""Streaming, columnar CSV parsing with per-row rejection accounting.

Every value is read as raw bytes and parsed column by column with pyarrow.compute, so one bad value
rejects (or, in a nullable column, nulls) one row instead of failing a whole block. Each rejection is
counted by reason and the first few are quoted with their file, line and column.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from data.io import fs_and_path
from data.schema import SchemaError

INT_RE = r"^\s*[+-]?\d+(\.0*)?\s*$"
FLOAT_RE = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"


class IngestError(ValueError):
    """Input that cannot be ingested at all (missing file or column, empty file); names the file."""


@dataclass
class Report:
    """What happened to one input file. Invariant: rows_read == rows_written + rows_rejected."""

    file: str
    max_examples: int = 20
    rows_read: int = 0
    rows_written: int = 0
    rejected: Counter = field(default_factory=Counter)
    nulled: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    def reject(self, reason: str, lines: np.ndarray, column: str | None = None,
               values: list | None = None) -> None:
        if len(lines) == 0:
            return
        self.rejected[reason] += len(lines)
        self._quote(reason, lines, column, values)

    def null(self, reason: str, lines: np.ndarray, column: str, values: list | None = None) -> None:
        if len(lines) == 0:
            return
        self.nulled[reason] += len(lines)
        self._quote(reason + " (set to null)", lines, column, values)

    def _quote(self, reason, lines, column, values) -> None:
        room = self.max_examples - sum(1 for e in self.examples if e["reason"] == reason)
        for k in range(min(room, len(lines))):
            ex = {"file": self.file, "line": int(lines[k]), "reason": reason}
            if column:
                ex["column"] = column
            if values is not None:
                ex["value"] = _show(values[k])
            self.examples.append(ex)

    def as_dict(self) -> dict:
        return {
            "file": self.file,
            "rows_read": self.rows_read,
            "rows_written": self.rows_written,
            "rows_rejected": self.rows_rejected,
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "values_set_to_null": dict(sorted(self.nulled.items())),
            "examples": self.examples,
        }

    def check(self) -> None:
        if self.rows_read != self.rows_written + self.rows_rejected:
            raise AssertionError(f"{self.file}: read {self.rows_read} != written {self.rows_written} "
                                 f"+ rejected {self.rows_rejected}")


def _show(v) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="backslashreplace")[:80]
    return str(v)[:80]


# ---------------------------------------------------------------- column parsers
# A parser takes the raw binary column and returns (parsed array with nulls where bad, bad mask, reason).

Parser = Callable[[pa.Array], tuple[pa.Array, np.ndarray, str]]


def _to_text(raw: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """binary -> string; rows with invalid UTF-8 come back null and flagged."""
    try:
        return raw.cast(pa.string()), np.zeros(len(raw), dtype=bool)
    except pa.ArrowInvalid:
        # Rare failure path only: find the offending rows one by one.
        bad = np.array([v is not None and not _is_utf8(v) for v in raw.to_pylist()], dtype=bool)
        cleaned = pc.if_else(pa.array(bad), pa.scalar(None, pa.binary()), raw)
        return cleaned.cast(pa.string()), bad


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _empty(text: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), ""), True).to_numpy(zero_copy_only=False)


def _mask(arr: pa.Array) -> np.ndarray:
    return pc.fill_null(arr, False).to_numpy(zero_copy_only=False)


def text() -> Parser:
    def parse(raw):
        t, bad = _to_text(raw)
        return pc.if_else(pa.array(_empty(t)), pa.scalar(None, pa.string()), t), bad, "invalid_utf8"
    return parse


def integer(type_: pa.DataType, lo: int | None = None, hi: int | None = None) -> Parser:
    info = np.iinfo(type_.to_pandas_dtype())
    lo = info.min if lo is None else lo
    hi = info.max if hi is None else hi

    def parse(raw):
        t, _ = _to_text(raw)
        ok = _mask(pc.match_substring_regex(t, INT_RE))
        digits = pc.replace_substring_regex(pc.utf8_trim_whitespace(t), r"\.0*$", "")
        digits = pc.if_else(pa.array(ok), digits, pa.scalar(None, pa.string()))
        try:
            v = digits.cast(pa.int64())
        except pa.ArrowInvalid:  # more digits than int64 holds
            ok &= _mask(pc.less_equal(pc.utf8_length(digits), 18))
            v = pc.if_else(pa.array(ok), digits, pa.scalar(None, pa.string())).cast(pa.int64())
        ok &= _mask(pc.and_(pc.greater_equal(v, lo), pc.less_equal(v, hi)))
        bad = ~ok & ~_empty(t)
        return pc.if_else(pa.array(ok), v, pa.scalar(None, pa.int64())).cast(type_), bad, "bad_integer"
    return parse


def number(type_: pa.DataType = pa.float32(), lo: float | None = None) -> Parser:
    def parse(raw):
        t, _ = _to_text(raw)
        ok = _mask(pc.match_substring_regex(t, FLOAT_RE))  # excludes nan/inf by construction
        v = pc.if_else(pa.array(ok), t, pa.scalar(None, pa.string())).cast(pa.float64())
        if lo is not None:
            ok &= _mask(pc.greater_equal(v, lo))
        bad = ~ok & ~_empty(t)
        return pc.if_else(pa.array(ok), v, pa.scalar(None, pa.float64())).cast(type_), bad, "bad_number"
    return parse


def date(fmt: str = "%Y-%m-%d") -> Parser:
    def parse(raw):
        t, _ = _to_text(raw)
        ts = pc.strptime(pc.utf8_trim_whitespace(t), format=fmt, unit="s", error_is_null=True)
        bad = _mask(pc.is_null(ts)) & ~_empty(t)
        return ts.cast(pa.date32()), bad, "bad_date"
    return parse


def parse_columns(batch: pa.RecordBatch, parsers: dict[str, Parser], required: set[str],
                  lines: np.ndarray, report: Report) -> tuple[dict[str, pa.Array], np.ndarray]:
    """Parses each column; returns arrays and the mask of rows to keep.

    A bad value in a required column rejects the row (first reason wins); in a nullable column the
    value becomes null and is counted. An empty value in a required column rejects as missing_value.
    """
    n = batch.num_rows
    rejected = np.zeros(n, dtype=bool)
    out = {}
    for name, parser in parsers.items():
        raw = batch.column(name)
        arr, bad, reason = parser(raw)
        if name in required:
            missing = _mask(pc.is_null(arr)) & ~bad
            for why, m in ((f"{reason}:{name}", bad), (f"missing_value:{name}", missing)):
                new = m & ~rejected
                idx = np.flatnonzero(new)
                report.reject(why, lines[idx], name, raw.take(pa.array(idx[:report.max_examples])).to_pylist())
                rejected |= new
        else:
            idx = np.flatnonzero(bad & ~rejected)
            report.null(f"{reason}:{name}", lines[idx], name, raw.take(pa.array(idx[:report.max_examples])).to_pylist())
        out[name] = arr
    return out, ~rejected


# ---------------------------------------------------------------- streaming reader


class _Translate(io.RawIOBase):
    """A read-only stream that replaces a multi-character separator (MovieLens '::') with one byte."""

    def __init__(self, f, old: bytes, new: bytes):
        self.f, self.old, self.new = f, old, new
        self.carry, self.buf, self.eof = b"", b"", False

    def readable(self):
        return True

    def readinto(self, b):
        while len(self.buf) < len(b) and not self.eof:
            chunk = self.f.read(1 << 20)
            data = self.carry + chunk
            self.eof = not chunk
            # Hold back a trailing partial separator so it is translated with the next chunk.
            k = 0 if self.eof else next((k for k in range(len(self.old) - 1, 0, -1)
                                         if data.endswith(self.old[:k])), 0)
            data, self.carry = (data[:-k], data[-k:]) if k else (data, b"")
            self.buf += data.replace(self.old, self.new)
        n = min(len(b), len(self.buf))
        b[:n], self.buf = self.buf[:n], self.buf[n:]
        return n


def stream_csv(url: str, expected: list[str], report: Report, *, delimiter: str = ",",
               column_names: list[str] | None = None, encoding: str = "utf8",
               block_size: int = 64 << 20, multi_char_delimiter: str | None = None,
               ) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """Yields (batch of binary columns, file line number of each row), in bounded memory.

    ``column_names`` is for headerless files. Rows with the wrong number of fields are rejected as
    ``malformed_row`` and quoted. Raises IngestError for a missing or empty file or missing columns.
    """
    fs, path = fs_and_path(url)
    if not fs.exists(path):
        raise IngestError(f"{url}: file not found")
    if fs.size(path) == 0:
        raise IngestError(f"{url}: file is empty")
    malformed: list[int] = []

    def on_invalid(row) -> str:
        line = int(row.number) if row.number is not None else -1
        malformed.append(line)
        report.reject("malformed_row", np.array([line]), None, [f"{row.actual_columns} fields, "
                                                                f"expected {row.expected_columns}: {row.text}"])
        return "skip"

    header_lines = 0 if column_names else 1
    read_opts = pcsv.ReadOptions(block_size=block_size, use_threads=False, encoding=encoding,
                                 column_names=column_names)
    parse_opts = pcsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid,
                                   quote_char='"' if delimiter == "," else False)
    with fs.open(path, "rb") as raw:
        src = _Translate(raw, multi_char_delimiter.encode(), delimiter.encode()) if multi_char_delimiter else raw
        src = io.BufferedReader(src, 1 << 20) if multi_char_delimiter else src
        try:
            # Everything is read as bytes: parsing and UTF-8 checks happen per column, per row.
            reader = pcsv.open_csv(src, read_options=read_opts, parse_options=parse_opts,
                                   convert_options=pcsv.ConvertOptions(
                                       column_types={c: pa.binary() for c in expected}))
        except pa.ArrowInvalid as e:
            if "Empty CSV file" in str(e):
                raise IngestError(f"{url}: file is empty (no header), or its header is longer than "
                                      f"the block size ({block_size} bytes)") from e
            raise IngestError(f"{url}: cannot read CSV header: {e}") from e
        names = reader.schema.names
        missing = [c for c in expected if c not in names]
        if missing:
            raise SchemaError(f"{url}: missing column(s) {missing}; found {names}")
        valid_seen = 0
        for batch in reader:
            n = batch.num_rows
            if n == 0:
                continue
            report.rows_read += n
            # Line of each valid row: skip over the malformed lines reported before it.
            m = np.sort(np.array(malformed, dtype=np.int64)) - 1 - header_lines
            q = m - np.arange(len(m))  # valid rows before each malformed one
            i = np.arange(valid_seen, valid_seen + n)
            lines = i + 1 + header_lines + np.searchsorted(q, i, side="right")
            valid_seen += n
            yield batch.select(expected), lines
        report.rows_read += len(malformed)
    if report.rows_read == 0:
        raise IngestError(f"{url}: no data rows")
