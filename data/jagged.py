"""Jagged lists on the host: one type for every list-per-row the project passes around (a batch's
histories and description tokens, customers' seen articles, evaluation targets, recent histories).

``Jagged(offsets, values)``: row ``i`` is ``values[offsets[i]:offsets[i + 1]]``, ``offsets`` from 0. On the
device the model reads TorchRec's KeyedJaggedTensor (trainer/model/inputs.py builds it from these).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class Jagged:
    offsets: np.ndarray  # (n + 1,) int64, offsets[0] == 0
    values: np.ndarray

    @classmethod
    def from_lengths(cls, lengths: np.ndarray, values: np.ndarray) -> "Jagged":
        return cls(np.r_[0, np.cumsum(lengths)].astype(np.int64), values)

    @classmethod
    def from_lists(cls, lists, dtype=np.int64) -> "Jagged":
        """From a sequence of per-row sequences."""
        lists = [np.asarray(x, dtype) for x in lists]
        return cls.from_lengths(np.array([len(x) for x in lists], np.int64),
                                np.concatenate(lists) if lists else np.zeros(0, dtype))

    @classmethod
    def from_arrow(cls, column: pa.Array | pa.ChunkedArray) -> "Jagged":
        """From an Arrow list column (one copy at most: a sliced array keeps its values' window)."""
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        off = arr.offsets.to_numpy().astype(np.int64)
        return cls(off - off[0], arr.values.to_numpy(zero_copy_only=False)[off[0]:off[-1]])

    @classmethod
    def empty(cls, n: int, dtype=np.int32) -> "Jagged":
        """``n`` empty rows."""
        return cls(np.zeros(n + 1, np.int64), np.zeros(0, dtype))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def owners(self) -> np.ndarray:
        """(values,) the row of each value."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.lengths())

    def slice(self, lo: int, hi: int) -> "Jagged":
        """Rows lo..hi-1 (views)."""
        return Jagged(self.offsets[lo:hi + 1] - self.offsets[lo], self.values[self.offsets[lo]:self.offsets[hi]])

    def take(self, rows: np.ndarray) -> "Jagged":
        """The lists of ``rows``, in that order (vectorised gather)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, lengths = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        out = np.r_[0, np.cumsum(lengths)].astype(np.int64)
        pos = np.arange(out[-1], dtype=np.int64) - np.repeat(out[:-1], lengths) + np.repeat(starts, lengths)
        return Jagged(out, self.values[pos])

    def concat(self, other: "Jagged") -> "Jagged":
        return Jagged(np.r_[self.offsets, other.offsets[1:] + self.offsets[-1]], np.r_[self.values, other.values])

    def append_rows(self, other: "Jagged") -> "Jagged":
        """Row i: this row i, then ``other``'s row i (both of the same rows)."""
        if len(other) != len(self):
            raise ValueError(f"{len(self)} rows and {len(other)} rows cannot be appended row by row")
        owners = np.r_[self.owners(), other.owners()]
        order = np.argsort(owners, kind="stable")
        return Jagged.from_lengths(self.lengths() + other.lengths(), np.r_[self.values, other.values][order])

    def astype(self, dtype) -> "Jagged":
        return Jagged(self.offsets, np.asarray(self.values, dtype))
