"""Streaming, columnar CSV parsing with per-row rejection accounting.

Every value is read as raw bytes and parsed column by column with pyarrow.compute, so one bad value
rejects (or, in a nullable column, nulls) one row instead of failing a whole block. Each rejection is
counted by reason and the first few are quoted with their file, line and column.
"""

from __future__ import annotations

import csv
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
    extra_columns: list = field(default_factory=list)  # in the file's header, not read

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
            **({"columns_ignored": self.extra_columns} if self.extra_columns else {}),
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


def _plain(text: pa.Array) -> pa.Array:
    """A number's text as pyarrow casts it: surrounding blanks and a leading '+' removed."""
    return pc.replace_substring_regex(pc.utf8_trim_whitespace(text), r"^\+", "")


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
        digits = pc.replace_substring_regex(_plain(t), r"\.0*$", "")
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
        v = pc.if_else(pa.array(ok), _plain(t), pa.scalar(None, pa.string())).cast(pa.float64())
        # 1e999 overflows to inf, 1e300 does not fit a float32: both are bad values, not infinities
        biggest = float(np.finfo(type_.to_pandas_dtype()).max)
        ok &= _mask(pc.less_equal(pc.abs(v), biggest))
        if lo is not None:
            ok &= _mask(pc.greater_equal(v, lo))
        bad = ~ok & ~_empty(t)
        return pc.if_else(pa.array(ok), v, pa.scalar(None, pa.float64())).cast(type_), bad, "bad_number"
    return parse


def date(fmt: str = "%Y-%m-%d") -> Parser:
    def parse(raw):
        t, _ = _to_text(raw)
        trimmed = pc.utf8_trim_whitespace(t)
        ts = pc.strptime(trimmed, format=fmt, unit="s", error_is_null=True)
        # strptime rolls 2018-02-30 over to 2018-03-02: a date must print back as it was written
        # (leading zeros aside)
        same = pc.equal(_unpadded(pc.strftime(ts, format=fmt)), _unpadded(trimmed))
        ts = pc.if_else(pc.fill_null(same, False), ts, pa.scalar(None, ts.type))
        bad = _mask(pc.is_null(ts)) & ~_empty(t)
        return ts.cast(pa.date32()), bad, "bad_date"
    return parse


def _unpadded(text: pa.Array) -> pa.Array:
    return pc.replace_substring_regex(text, r"(^|\D)0+(\d)", r"\1\2")


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
#
# The file is cut into blocks at record boundaries here, not by pyarrow's streaming reader, so that:
# a quoted newline straddling a block is never split; every record's file line is known (blank lines
# and quoted newlines counted); a row with the wrong number of fields is rejected with its own line; an
# multi-character separator is translated on whole records. All of it is vectorised over the block's
# bytes with NumPy: newline, quote and delimiter positions, and quote parity before each of them.
#
# Broken quoting never merges records. A quoted field must close with a quote followed by the separator,
# the end of the record or the quote that escapes it; a field that opens a quote on one line and would
# swallow later lines that are complete records on their own (the right number of fields, quoted well),
# or that stays open to the end of the file, is a stray quote. Either way the line of the quote that
# opened the field is set apart as one ``malformed_quoting`` record, and the quoting starts afresh on the
# next line, so each later line is the record it is on its own. (A genuine multi-line field one of whose
# inner lines looks like a whole record is read as such lines; the rejection names them.)

NL, CR, QUOTE = 10, 13, 34


def _quotes(a: np.ndarray, delim: int) -> np.ndarray:
    """Positions of the quotes that count for quoting, as pyarrow's parser reads them.

    A quote opens a quoted field only at the start of a field; elsewhere outside quotes it is a literal
    character (``ab"c``). Literal quotes are dropped until the parity is consistent (rarely more than
    one pass; none in well-formed files).
    """
    q = np.flatnonzero(a == QUOTE)
    while len(q):
        opening = (np.arange(len(q)) % 2) == 0  # an even number of quotes before it: outside quotes
        prev = np.where(q > 0, a[np.maximum(q - 1, 0)], NL)
        at_field_start = (prev == delim) | (prev == NL) | (prev == CR) | (q == 0)
        escaped = np.isin(q - 1, q)  # the second quote of "" inside a quoted field
        literal = opening & ~at_field_start & ~escaped
        if not literal.any():
            break
        q = np.delete(q, np.flatnonzero(literal)[0])  # the first one changes the parity after it
    return q


def _outside(positions: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Mask of positions outside quoted fields (an even number of counted quotes before them)."""
    return (np.searchsorted(q, positions) % 2) == 0


class _Records:
    """Complete records of one block: byte spans, first line of each, fields counted outside quotes."""

    def __init__(self, data: bytes, starts: np.ndarray, ends: np.ndarray, lines: np.ndarray,
                 fields: np.ndarray, bad_quoting: np.ndarray | None = None):
        self.data, self.starts, self.ends, self.lines, self.fields = data, starts, ends, lines, fields
        self.bad_quoting = np.zeros(len(starts), bool) if bad_quoting is None else bad_quoting

    def drop_first(self) -> "_Records":
        return _Records(self.data, self.starts[1:], self.ends[1:], self.lines[1:], self.fields[1:],
                        self.bad_quoting[1:])

    def text(self, i: int) -> str:
        return self.data[self.starts[i]:self.ends[i]].decode("utf-8", errors="backslashreplace").rstrip("\r\n")

    def take(self, keep: np.ndarray) -> bytes:
        """The bytes of the kept records, in order (one vectorised gather)."""
        if not keep.any():
            return b""
        if keep.all() and np.array_equal(self.starts[1:], self.ends[:-1]):  # contiguous: no blank lines between
            return self.data[self.starts[0]:self.ends[-1]]
        a = np.frombuffer(self.data, np.uint8)
        lengths = (self.ends - self.starts)[keep]
        idx = np.repeat(self.starts[keep] - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
        return a[idx].tobytes()


class _BlockSplitter:
    """Cuts a byte stream into blocks of complete records, counting lines from the start of the file."""

    def __init__(self, url: str, delimiter: bytes, quoting: bool, translate: tuple[bytes, bytes] | None,
                 max_record: int):
        self.url, self.delim, self.quoting, self.translate = url, delimiter[0], quoting, translate
        self.max_record = max_record
        self.n_fields: int | None = None  # the header's, once known: what "a complete record" means
        self.carry = b""
        self.line = 1  # file line of the first byte of ``carry``

    def _whole_record(self, line: bytes) -> bool:
        """A line that is a well-quoted record with the header's number of fields by itself (Python's csv
        in strict mode, and quotes in pairs)."""
        text = line.decode("utf-8", errors="replace").rstrip("\r\n")
        if self.n_fields is None or not text.strip() or text.count('"') % 2:  # an odd quote: part of a field
            return False
        try:
            rows = list(csv.reader([text], delimiter=chr(self.delim), strict=True))
        except csv.Error:
            return False
        return len(rows) == 1 and len(rows[0]) == self.n_fields

    def _swallows_records(self, a: np.ndarray, nl: np.ndarray, opener: int, until: int) -> bool:
        """Whether the lines after the opener's, up to the one holding byte ``until``, include a whole record."""
        i, j = np.searchsorted(nl, opener), np.searchsorted(nl, until)
        bounds = nl[i:j + 1]
        return any(self._whole_record(a[b + 1:e + 1].tobytes()) for b, e in zip(bounds[:-1], bounds[1:]))

    def _stray_opener(self, a: np.ndarray, nl: np.ndarray, q: np.ndarray, eof: bool) -> int | None:
        """Byte position of the first quote that opened a badly quoted field (see above), or None."""
        n, openers, closers = len(a), q[0::2], q[1::2]
        after = closers + 1
        follow = np.where(after < n, a[np.minimum(after, n - 1)], NL)
        escaped = np.zeros(len(closers), bool)  # "" inside a quoted field: a close and a reopen
        m = min(len(closers), len(openers) - 1)
        escaped[:m] = openers[1:m + 1] == after[:m]
        # the quote that opened each pair's field (a reopen after "" belongs to the field opened before)
        reopen = np.r_[False, escaped[:len(openers) - 1]]
        root = openers[np.maximum.accumulate(np.where(reopen, 0, np.arange(len(openers))))]
        ok = (after >= n) | (follow == self.delim) | (follow == NL) | (follow == CR) | escaped
        bad = np.flatnonzero(~ok)
        first = int(root[bad[0]]) if len(bad) else None
        spans = np.flatnonzero(np.searchsorted(nl, root[:len(closers)]) != np.searchsorted(nl, closers))
        for k in spans:  # fields spanning lines (few): before the first bad close only
            if first is not None and root[k] >= first:
                break
            if self._swallows_records(a, nl, int(root[k]), int(closers[k])):
                return int(root[k])
        if first is None and len(openers) > len(closers):  # a field still open at the end of the data
            last = int(root[-1])
            if eof or self._swallows_records(a, nl, last, int(nl[-1]) if len(nl) else last):
                return last
        return first

    def _quoting(self, a: np.ndarray, nl: np.ndarray, eof: bool) -> tuple[np.ndarray, list[int]]:
        """The quotes that count, and the starts of the lines set apart for a stray quote."""
        q, kept, apart = _quotes(a, self.delim), [], []
        while len(q):
            opener = self._stray_opener(a, nl, q, eof)
            if opener is None:
                break
            i = int(np.searchsorted(nl, opener))
            start = int(nl[i - 1]) + 1 if i else 0
            if i == len(nl) and not eof:
                break  # its line is not complete yet: decided on the next read
            end = int(nl[i]) + 1 if i < len(nl) else len(a)
            kept.append(q[q < start])
            apart.append(start)
            q = _quotes(a[end:], self.delim) + end  # the quoting starts afresh on the next line
        return np.concatenate([*kept, q]).astype(np.int64), apart

    def feed(self, chunk: bytes) -> _Records | None:
        eof = not chunk
        data = self.carry + chunk
        if not data:
            return None
        a = np.frombuffer(data, np.uint8)
        nl = np.flatnonzero(a == NL)
        q, apart = self._quoting(a, nl, eof) if self.quoting else (np.zeros(0, np.int64), [])
        ends = nl[_outside(nl, q)] + 1 if len(q) else nl + 1
        if eof:
            if not len(ends) or ends[-1] != len(data):
                ends = np.r_[ends, len(data)]  # last record without a final newline
        complete = int(ends[-1]) if len(ends) else 0
        self.carry = data[complete:]
        if len(self.carry) > self.max_record:
            raise IngestError(f"{self.url}: line {self.line + len(nl[nl < complete])}: one record longer than "
                              f"{self.max_record} bytes (a quote that never closes?)")
        if not complete:
            return None
        starts = np.r_[0, ends[:-1]]
        lines = self.line + np.searchsorted(nl, starts)
        self.line += int(np.searchsorted(nl, complete))
        data = data[:complete]
        if self.translate:  # on whole records, so a separator never straddles two reads; newlines unchanged
            data = data.replace(*self.translate)
            a = np.frombuffer(data, np.uint8)
            ends = np.flatnonzero(a == NL) + 1
            if data[-1:] != b"\n":
                ends = np.r_[ends, len(data)]
            starts = np.r_[0, ends[:-1]]
        body = ends - starts - (a[ends - 1] == NL) - ((ends - starts >= 2) & (a[np.maximum(ends - 2, 0)] == CR))
        blank = body <= 0
        d = np.flatnonzero(a == self.delim)
        if len(q):
            d = d[_outside(d, q)]
        fields = np.diff(np.searchsorted(d, np.r_[starts, ends[-1]])) + 1
        bad_quoting = np.isin(starts, np.array(apart, np.int64))
        keep = ~blank | bad_quoting
        return _Records(data, starts[keep], ends[keep], lines[keep], fields[keep], bad_quoting[keep])


def _parse_header(head: bytes, delimiter: str, encoding: str) -> list[str]:
    return pcsv.read_csv(io.BytesIO(head + b"\n"), read_options=pcsv.ReadOptions(encoding=encoding),
                         parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                                         quote_char='"' if delimiter == "," else False)).column_names


def stream_csv(url: str, expected: list[str], report: Report, *, delimiter: str = ",",
               column_names: list[str] | None = None, encoding: str = "utf8",
               block_size: int = 64 << 20, multi_char_delimiter: str | None = None,
               ) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """Yields (batch of binary columns, file line number of each row), in bounded memory.

    ``column_names`` is for headerless files. Rows with the wrong number of fields are rejected as
    ``malformed_row``, lines with broken quoting as ``malformed_quoting``, each quoted with its line;
    blank lines are not rows. Raises IngestError for a missing or empty file or missing columns. Columns
    beyond ``expected`` are listed in the report as ignored.
    """
    fs, path = fs_and_path(url)
    if not fs.exists(path):
        raise IngestError(f"{url}: file not found")
    if fs.size(path) == 0:
        raise IngestError(f"{url}: file is empty")
    quoting = delimiter == ","
    translate = (multi_char_delimiter.encode(), delimiter.encode()) if multi_char_delimiter else None
    splitter = _BlockSplitter(url, delimiter.encode(), quoting, translate, max_record=16 * block_size + (1 << 20))
    names = list(column_names) if column_names else None
    header = names is None
    with fs.open(path, "rb") as f:
        chunk = f.read(block_size)
        if header:  # read first, so that the field count is known to the whole file's quoting checks
            while b"\n" not in chunk.lstrip(b"\r\n") and (more := f.read(block_size)):
                chunk += more
            head = chunk.lstrip(b"\r\n").split(b"\n", 1)[0]
            if not head.strip(b"\r"):
                raise IngestError(f"{url}: file is empty (no header)")
            names = _parse_header(head.replace(*translate) if translate else head, delimiter, encoding)
            missing = [c for c in expected if c not in names]
            if missing:
                raise SchemaError(f"{url}: missing column(s) {missing}; found {names}")
            report.extra_columns = [c for c in names if c not in expected]
        splitter.n_fields = len(names)
        while True:
            rec = splitter.feed(chunk)
            if rec is not None and len(rec.starts) and header:
                rec, header = rec.drop_first(), False
            if rec is not None and len(rec.starts):
                yield from _parse_block(url, rec, names, expected, report, delimiter, encoding)
            if not chunk:
                break
            chunk = f.read(block_size)
    if report.rows_read == 0:
        raise IngestError(f"{url}: no data rows")


def _parse_block(url, rec: _Records, names, expected, report: Report, delimiter, encoding):
    n = len(rec.starts)
    report.rows_read += n
    quoting = np.flatnonzero(rec.bad_quoting)
    report.reject("malformed_quoting", rec.lines[quoting], None,
                  [f"a quoted field that does not close well: {rec.text(i)}" for i in quoting[:report.max_examples]])
    ok = (rec.fields == len(names)) & ~rec.bad_quoting
    bad = np.flatnonzero((rec.fields != len(names)) & ~rec.bad_quoting)
    report.reject("malformed_row", rec.lines[bad], None,
                  [f"{rec.fields[i]} fields, expected {len(names)}: {rec.text(i)}" for i in bad[:report.max_examples]])
    if not ok.any():
        return
    lines = rec.lines[ok]
    invalid = []
    table = pcsv.read_csv(
        io.BytesIO(rec.take(ok)),
        read_options=pcsv.ReadOptions(column_names=names, encoding=encoding, use_threads=False,
                                      block_size=max(1 << 20, len(rec.data) + 1)),
        parse_options=pcsv.ParseOptions(delimiter=delimiter, quote_char='"' if delimiter == "," else False,
                                        newlines_in_values=delimiter == ",", ignore_empty_lines=False,
                                        invalid_row_handler=lambda row: invalid.append(row.text) or "skip"),
        convert_options=pcsv.ConvertOptions(column_types={c: pa.binary() for c in expected}, include_columns=expected))
    if invalid or table.num_rows != len(lines):
        raise IngestError(f"{url}: lines {lines[0]}-{lines[-1]}: the CSV parser read {table.num_rows} rows where "
                          f"{len(lines)} were counted ({invalid[:3]}); please report this file's lines")
    for batch in table.to_batches():
        yield batch, lines[:batch.num_rows]
        lines = lines[batch.num_rows:]
