"""data.stream: coverage, equal batch counts, exact resume (with workers), batch contents, bad input."""

from __future__ import annotations

import shutil
from collections import Counter

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.batch import Batch
from data.io import join, read_json, write_json
from data.loader import make_loader
from data.stream import ExampleStream, StreamError
from trainer.model.negatives import UniformNegatives


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


def epoch_batches(prepared, world_size: int, workers: int, epoch: int = 0, start: int = 0, extra: int = 16,
                  **kw) -> list[list[Batch]]:
    """Every rank's batches of an epoch, through the loader (with its worker processes), each with its
    share of ``extra`` uniform catalogue articles (the trainer's mixed negatives)."""
    out = []
    n_items = ExampleStream(prepared, **kw).tables.cards["article_id"]
    for r in range(world_size):
        rows = UniformNegatives(extra, n_items, kw["seed"], r, world_size) if extra else None
        s = ExampleStream(prepared, rank=r, world_size=world_size, num_workers=workers, extra_rows=rows, **kw)
        s.set_epoch(epoch, start)
        out.append(collect(make_loader(s)))
    return out


KW = dict(batch_size=240, shuffle_rows=2500, seed=5)


@pytest.mark.parametrize("world_size,workers", [(2, 1), (2, 2), (3, 2), (4, 3)])
def test_ranks_share_the_one_rank_batches(tiny_prepared, world_size, workers):
    """Rank r's k-th batch is slice r of the one-rank k-th batch (rows, features, and its share of the
    uniform negatives), whatever the ranks and loader workers: N ranks train what one rank trains."""
    prepared, _ = tiny_prepared
    one = epoch_batches(prepared, 1, 1, epoch=2, **KW)[0]
    many = epoch_batches(prepared, world_size, workers, epoch=2, **KW)
    assert all(len(b) == len(one) == ExampleStream(prepared, **KW).batches_per_epoch(2) for b in many)
    n = KW["batch_size"] // world_size
    for k, whole in enumerate(one):
        rows = rows_of(whole)
        for r in range(world_size):
            part = many[r][k]
            assert rows_of(part) == rows[r * n:(r + 1) * n]
            assert torch.equal(part.query_dense, whole.query_dense[r * n:(r + 1) * n])
            for key in ("section", "colour_group"):
                assert torch.equal(part.item[key].values(), whole.item[key].values()[r * n:(r + 1) * n])
        extras = torch.cat([many[r][k].extra_ids for r in range(world_size)])
        assert torch.equal(extras, whole.extra_ids)  # each rank holds its share of the global draw


def test_an_epoch_is_its_rows_once_in_whole_batches(tiny_prepared):
    """The one-rank epoch: real example rows, none more often than it exists, all but fewer than a batch of
    them, reshuffled per epoch."""
    prepared, _ = tiny_prepared
    truth = all_example_rows(prepared)
    epochs = []
    for epoch in (0, 1):
        got = Counter()
        batches = epoch_batches(prepared, 1, 2, epoch=epoch, **KW)[0]
        for b in batches:
            got.update(rows_of(b))
        assert not got - truth
        assert sum(truth.values()) - KW["batch_size"] < sum(got.values()) == len(batches) * KW["batch_size"]
        epochs.append([rows_of(b) for b in batches[:3]])
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("world_size,workers,start", [(1, 1, 7), (2, 2, 7), (2, 3, 1), (3, 2, 30)])
def test_a_resumed_epoch_continues_exactly(tiny_prepared, world_size, workers, start):
    """set_epoch(epoch, start) yields the epoch's batches from global batch ``start`` on, on any world size
    and any number of loader workers: the position is global."""
    prepared, _ = tiny_prepared
    full = epoch_batches(prepared, world_size, 1, epoch=3, **KW)
    tail = epoch_batches(prepared, world_size, workers, epoch=3, start=start, **KW)
    for r in range(world_size):
        assert len(tail[r]) == len(full[r]) - start
        assert all(same(x, y) for x, y in zip(tail[r], full[r][start:]))


def test_a_batch_that_does_not_divide_over_the_ranks_is_an_error(tiny_prepared):
    with pytest.raises(StreamError, match="global batch of 250 rows does not divide over 3 rank"):
        ExampleStream(tiny_prepared[0], 250, world_size=3)


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


def test_too_little_data_for_one_global_batch(tiny_prepared):
    with pytest.raises(StreamError, match="fewer than one global batch of 60000"):
        ExampleStream(tiny_prepared[0], 60_000, world_size=2).plan(0)
