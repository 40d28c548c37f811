"""data/jagged.py against plain Python lists."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data.jagged import Jagged


def lists_of(j: Jagged) -> list[list[int]]:
    return [j.values[j.offsets[i]:j.offsets[i + 1]].tolist() for i in range(len(j))]


def random_lists(rng, n: int) -> list[list[int]]:
    return [rng.integers(0, 50, rng.integers(0, 5)).tolist() for _ in range(n)]


def test_every_operation_against_python_lists():
    rng = np.random.default_rng(0)
    lists = random_lists(rng, 30)
    j = Jagged.from_lists(lists)
    assert lists_of(j) == lists and len(j) == 30 and j.offsets[0] == 0
    assert j.lengths().tolist() == [len(x) for x in lists]
    assert [j.row(i).tolist() for i in range(30)] == lists
    assert j.owners().tolist() == [i for i, x in enumerate(lists) for _ in x]
    rows = rng.integers(0, 30, 40)  # repeats and any order
    assert lists_of(j.take(rows)) == [lists[r] for r in rows]
    assert lists_of(j.take(np.zeros(0, np.int64))) == []
    assert lists_of(j.slice(7, 19)) == lists[7:19]
    more = random_lists(rng, 5)
    assert lists_of(j.concat(Jagged.from_lists(more))) == lists + more
    assert lists_of(Jagged.empty(3)) == [[], [], []]
    other = random_lists(rng, 30)
    assert lists_of(j.append_rows(Jagged.from_lists(other))) == [x + y for x, y in zip(lists, other)]


def test_from_arrow_reads_a_sliced_chunked_list_column():
    lists = [[1, 2], [], [3], [4, 5, 6], [7]]
    arr = pa.chunked_array([pa.array(lists[:2], pa.list_(pa.int32())), pa.array(lists[2:], pa.list_(pa.int32()))])
    assert lists_of(Jagged.from_arrow(arr)) == lists
    sliced = pa.array(lists, pa.list_(pa.int32())).slice(2, 3)  # offsets not from 0
    j = Jagged.from_arrow(sliced)
    assert j.offsets[0] == 0 and lists_of(j) == lists[2:]
    assert j.astype(np.int64).values.dtype == np.int64
