"""data.stream: coverage, equal batch counts, exact resume (with workers), batch contents, bad input."""

from __future__ import annotations

import shutil
from collections import Counter

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.io import join, read_json, write_json
from data.stream import Batch, ExampleStream, StreamError, make_loader


def rows_of(batch: Batch) -> list[tuple]:
    hist = batch.query["history"]
    lengths = hist.lengths().tolist()
    values = hist.values().tolist()
    out, pos = [], 0
    for c, a, n in zip(batch.customer_idx.tolist(), batch.article_idx.tolist(), lengths):
        out.append((c, a, tuple(values[pos:pos + n])))
        pos += n
    return out


def all_example_rows(prepared: str) -> Counter:
    t = pq.read_table(join(prepared, "examples"))
    return Counter(zip(t["customer_idx"].to_pylist(), t["article_idx"].to_pylist(),
                       map(tuple, t["history"].to_pylist())))


@pytest.mark.parametrize("world_size,workers", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_plan_covers_units_disjointly_with_equal_batches(tiny_prepared, world_size, workers):
    prepared, _ = tiny_prepared
    streams = [ExampleStream(prepared, 256, rank=r, world_size=world_size, num_workers=workers)
               for r in range(world_size)]
    for epoch in (0, 1):
        plan = streams[0].plan(epoch)
        seen = [(u.file, u.row_group) for p in plan.values() for u in p.units]
        assert len(seen) == len(set(seen)) == len(streams[0].units)  # complete and disjoint
        quotas = [sum(plan[(r, w)].quota for w in range(workers)) for r in range(world_size)]
        assert len(set(quotas)) == 1
        assert all(plan[k].quota * 256 <= plan[k].rows for k in plan)
    assert streams[0].plan(0) != streams[0].plan(1)  # reshuffled per epoch


@pytest.mark.parametrize("world_size,workers", [(2, 1), (2, 2)])
def test_yielded_rows_are_disjoint_real_examples(tiny_prepared, world_size, workers):
    prepared, _ = tiny_prepared
    truth = all_example_rows(prepared)
    got, counts = Counter(), []
    for r in range(world_size):
        s = ExampleStream(prepared, 256, rank=r, world_size=world_size, num_workers=workers, shuffle_rows=3000)
        n = 0
        for b in make_loader(s):
            got.update(rows_of(b))
            n += 1
        counts.append(n)
        assert n == s.batches_per_epoch()
    assert len(set(counts)) == 1
    assert not got - truth  # every yielded row is a real example, never yielded more often than it exists
    assert sum(got.values()) == counts[0] * world_size * 256
    assert sum(got.values()) > 0.9 * sum(truth.values())  # only the remainder past equal counts is left out


def collect(loader, n=None) -> list[Batch]:
    out = []
    for b in loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def same(a: Batch, b: Batch) -> bool:
    extras_same = (a.extra_ids is None and b.extra_ids is None) or (
        torch.equal(a.extra_ids, b.extra_ids) and torch.equal(a.extra_item.values(), b.extra_item.values()))
    return (torch.equal(a.customer_idx, b.customer_idx) and torch.equal(a.article_idx, b.article_idx)
            and torch.equal(a.query.values(), b.query.values()) and torch.equal(a.query.lengths(), b.query.lengths())
            and torch.equal(a.item.values(), b.item.values()) and torch.equal(a.query_dense, b.query_dense)
            and extras_same)


@pytest.mark.parametrize("workers,stop_at", [(1, 7), (2, 7), (2, 1), (2, 30)])
def test_resume_mid_epoch_is_exact(tiny_prepared, workers, stop_at):
    prepared, _ = tiny_prepared
    kw = dict(batch_size=200, rank=1, world_size=2, num_workers=workers, shuffle_rows=2500, seed=5, extra_items=16)
    s = ExampleStream(prepared, **kw)
    s.set_epoch(3)
    full = collect(make_loader(s))
    s2 = ExampleStream(prepared, **kw)
    s2.set_epoch(3)
    loader = make_loader(s2)
    head = collect(loader, stop_at)
    state = loader.state_dict()
    s3 = ExampleStream(prepared, **kw)
    loader3 = make_loader(s3)
    loader3.load_state_dict(state)
    tail = collect(loader3)
    assert len(head) + len(tail) == len(full)
    assert all(same(x, y) for x, y in zip(head + tail, full))


def test_stream_state_alone_resumes_exactly(tiny_prepared):
    prepared, _ = tiny_prepared
    s = ExampleStream(prepared, 300, shuffle_rows=2000)
    full = list(iter(s))
    s = ExampleStream(prepared, 300, shuffle_rows=2000)
    it = iter(s)
    head = [next(it) for _ in range(11)]
    state = s.state_dict()
    s2 = ExampleStream(prepared, 300, shuffle_rows=2000)
    s2.load_state_dict(state)
    assert all(same(x, y) for x, y in zip(head + list(iter(s2)), full))
    with pytest.raises(StreamError, match="batch_size=300"):
        ExampleStream(prepared, 301).load_state_dict(state)


def test_batch_contents_match_feature_tables(tiny_prepared):
    prepared, m = tiny_prepared
    s = ExampleStream(prepared, 128)
    b = next(iter(s))
    assert b.query.keys() == ["customer_id", "age_bucket", "club_status", "news_freq", "postal_code", "history"]
    cust = {r["customer_idx"]: r for r in pq.read_table(join(prepared, "features", "customers.parquet")).to_pylist()}
    art = {r["article_idx"]: r for r in pq.read_table(join(prepared, "features", "articles.parquet")).to_pylist()}
    q, i = b.query.to_dict(), b.item.to_dict()
    for row, c in enumerate(b.customer_idx.tolist()):
        assert q["customer_id"].values()[row].item() == c
        assert q["age_bucket"].values()[row].item() == cust[c]["age_bucket"]
        assert q["postal_code"].values()[row].item() == cust[c]["postal_code"]
    desc = i["desc_tokens"].to_dense()
    for row, a in enumerate(b.article_idx.tolist()):
        assert i["section"].values()[row].item() == art[a]["section"]
        assert desc[row].tolist() == art[a]["desc_tokens"]
    assert b.query_dense.shape == (128, 2)
    assert torch.allclose(b.query_dense.pow(2).sum(1), torch.ones(128))  # sin^2 + cos^2


def copy_prepared(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_memory_filesystem(tiny_prepared):
    prepared, _ = tiny_prepared
    mem = fsspec.filesystem("memory")
    local = fsspec.filesystem("file")
    for path in local.find(prepared):
        rel = path[len(prepared):].lstrip("/")
        with local.open(path, "rb") as f, mem.open(f"/stream-test/{rel}", "wb") as g:
            g.write(f.read())
    a = list(iter(ExampleStream("memory://stream-test", 500)))
    b = list(iter(ExampleStream(prepared, 500)))
    assert len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def test_empty_shard_is_skipped_and_reported(tiny_prepared, tmp_path):
    prepared = copy_prepared(tiny_prepared[0], tmp_path / "p")
    m = read_json(join(prepared, "manifest.json"))
    empty = pa.table({"customer_idx": pa.array([], pa.int32()), "article_idx": pa.array([], pa.int32()),
                      "day": pa.array([], pa.int32()), "history": pa.array([], pa.list_(pa.int32()))})
    pq.write_table(empty, join(prepared, "examples", "part-empty.parquet"))
    m["examples"]["shards"].append({"file": "examples/part-empty.parquet", "rows": 0})
    write_json(m, join(prepared, "manifest.json"))
    s = ExampleStream(prepared, 256)
    assert s.manifest["skipped_empty_shards"] == [join(prepared, "examples", "part-empty.parquet")]
    assert len(list(iter(s))) == s.batches_per_epoch() > 0


def test_schema_mismatch_names_the_shard(tiny_prepared, tmp_path):
    prepared = copy_prepared(tiny_prepared[0], tmp_path / "p")
    shard = join(prepared, "examples", "part-00001.parquet")
    t = pq.read_table(shard)
    pq.write_table(t.set_column(0, "customer_idx", t["customer_idx"].cast(pa.int64())), shard)
    with pytest.raises(StreamError, match="part-00001.parquet: schema .* differs"):
        ExampleStream(prepared, 256)


def test_corrupt_shard_names_the_file(tiny_prepared, tmp_path):
    prepared = copy_prepared(tiny_prepared[0], tmp_path / "p")
    shard = join(prepared, "examples", "part-00002.parquet")
    with open(shard, "r+b") as f:
        f.seek(-100, 2)
        f.write(b"\0" * 100)
    with pytest.raises(StreamError, match="part-00002.parquet: not a readable Parquet file"):
        ExampleStream(prepared, 256)


def test_missing_feature_table(tiny_prepared, tmp_path):
    prepared = copy_prepared(tiny_prepared[0], tmp_path / "p")
    (tmp_path / "p" / "features" / "articles.parquet").unlink()
    with pytest.raises(StreamError, match="features/articles.parquet: feature table missing"):
        ExampleStream(prepared, 256)


def test_ids_outside_vocabulary_become_oov_and_are_counted(tiny_prepared, tmp_path):
    prepared = copy_prepared(tiny_prepared[0], tmp_path / "p")
    m = read_json(join(prepared, "manifest.json"))
    n_art = m["cardinalities"]["article_id"]
    for shard in m["examples"]["shards"]:
        path = join(prepared, shard["file"])
        t = pq.read_table(path)
        a = t["article_idx"].to_numpy().copy()
        a[::50] = n_art + 7
        pq.write_table(t.set_column(1, "article_idx", pa.array(a, pa.int32())), path, row_group_size=1024)
    s = ExampleStream(prepared, 256)
    batches = list(iter(s))
    assert s.oov["article_idx"] > 0
    assert max(int(b.article_idx.max()) for b in batches) < n_art
    assert int(sum((b.article_idx == 0).sum() for b in batches)) == s.oov["article_idx"]


def test_too_little_data_for_the_world(tiny_prepared):
    with pytest.raises(StreamError, match="too few examples"):
        ExampleStream(tiny_prepared[0], 40_000, world_size=2).plan(0)
