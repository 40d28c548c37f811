"""Weekly drops and the prepared datasets grown from each other (data/drops.py, prepare.parent)."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
from conftest import prepare_drop, prepare_options
from omegaconf import OmegaConf

from data import vocab
from data.config import DataConfig, SplitConfig
from data.io import read_articles, read_customers, read_table
from data.prepare import prepare


@pytest.fixture(scope="module")
def two_drops(tiny_drops):
    d = tiny_drops
    return d["root"], d["out"], d["summaries"], d["first"], d["second"]


def test_a_drop_holds_what_was_known_before_its_day(two_drops):
    root, out, summaries, _, _ = two_drops
    tx = read_table(f"{root}/transactions")
    until = np.datetime64(summaries[0]["until"], "D")
    days = tx["t_dat"].to_numpy().astype("datetime64[D]")
    first = read_table(f"{out}/week-01/transactions")
    assert first.num_rows == int((days < until).sum()) and summaries[1]["transactions"] == tx.num_rows
    before = tx.filter(days < until)
    assert set(read_customers(f"{out}/week-01")["customer_id"].to_pylist()) == set(before["customer_id"].to_pylist())
    truth = read_table(f"{root}/_truth/articles.parquet")
    launched = set(truth.filter(pc.less(truth["launch_day"], int(until.astype(np.int64))))["article_id"].to_pylist())
    want = set(before["article_id"].to_pylist()) | launched
    assert set(read_articles(f"{out}/week-01")["article_id"].to_pylist()) == want
    assert summaries[0]["articles_not_sold_yet"] == len(want - set(before["article_id"].to_pylist())) > 0


def test_a_grown_dataset_keeps_every_row_of_its_parent_and_records_the_lineage(two_drops):
    _, _, _, first, second = two_drops
    for name in ("customer_id", "article_id", "product_type", "section"):
        old, new = vocab.load(first.url, name), vocab.load(second.url, name)
        assert new.slice(0, old.num_rows)["value"].combine_chunks().equals(old["value"].combine_chunks()), name
    assert second.n_articles > first.n_articles and second.n_customers > first.n_customers
    assert second.lineage.versions == (first.version, second.version) and first.lineage.versions == (first.version,)
    assert second.parent["version"] == first.version and second.parent["new_article_id"] == \
        second.n_articles - first.n_articles
    # the rows listed since the parent: above the parent's (its vocabulary's size), none known without one
    assert second.parent_rows("article_id") == first.n_articles and first.parent_rows("article_id") is None
    # ... and entered the shop after the parent's data: their listing day; the first version's rows unknown
    assert second.lineage.listed_from == (None, first.last_day + 1)
    days = second.listing_days("article_id")
    assert (days[:first.n_articles] == -1).all() and (days[first.n_articles:] == first.last_day + 1).all()
    # the feature rows of the parent's ids are the parent's
    for name, key in (("customers", "customer_idx"), ("articles", "article_idx")):
        a = read_table(f"{first.url}/features/{name}.parquet")
        b = read_table(f"{second.url}/features/{name}.parquet")
        b = b.filter(pc.is_in(b[key], value_set=a[key].combine_chunks()))
        assert b.select(a.column_names).equals(a), name


def test_a_version_names_the_rows_not_the_run(two_drops, tmp_path):
    """The same drop prepared again elsewhere has the same version; grown by nothing new, it has its parent's
    version (no row changed); the second drop built afresh numbers some ids otherwise, so another version."""
    _, out, _, first, second = two_drops
    again = prepare_drop(f"{out}/week-01", out=str(tmp_path / "again"))
    assert again.version == first.version
    grown_by_nothing = prepare_drop(f"{out}/week-01", parent=first.url, out=str(tmp_path / "same"))
    assert grown_by_nothing.lineage.versions == (first.version, first.version)
    afresh = prepare_drop(f"{out}/week-02", out=str(tmp_path / "afresh"))
    assert afresh.version != second.version and afresh.n_articles == second.n_articles


def test_a_parent_with_other_feature_options_is_refused_by_name(two_drops, tmp_path):
    _, out, _, first, _ = two_drops
    with pytest.raises(ValueError, match="prepare.postal_buckets=65536.*this run has 1024"):
        prepare(OmegaConf.structured(DataConfig(name="drop", root=f"{out}/week-02")),
                OmegaConf.structured(SplitConfig()),
                prepare_options(str(tmp_path / "p"), parent=first.url, postal_buckets=1024), progress=False)


def test_the_prepared_contract_names_what_is_missing(tiny_prepared, tmp_path):
    import json

    from data.prepared import Prepared, PreparedError

    prepared, manifest = tiny_prepared
    ds = Prepared.read(prepared)
    assert ds.n_articles == manifest["cardinalities"]["article_id"] and ds["eval"] == manifest["eval"]
    assert ds.version == manifest["lineage"][-1]["version"] and ds.parent is None
    with pytest.raises(PreparedError, match=f"{tmp_path}/manifest.json: no prepared dataset here"):
        Prepared.read(str(tmp_path))
    broken = {k: v for k, v in manifest.items() if k != "history_len"}
    (tmp_path / "manifest.json").write_text(json.dumps(broken, default=str))
    with pytest.raises(PreparedError, match="missing entry 'history_len'"):
        Prepared.read(str(tmp_path))
    del broken["lineage"]  # prepared before lineages: no version, still readable
    broken["history_len"] = 20
    (tmp_path / "manifest.json").write_text(json.dumps(broken, default=str))
    assert Prepared.read(str(tmp_path)).version is None


def test_a_single_cut_as_known_before_a_day(tiny_synth, tmp_path):
    from data import drops

    root, _ = tiny_synth
    got = drops.cut(root, str(tmp_path / "cut"), "2019-01-01")
    tx = read_table(str(tmp_path / "cut" / "transactions"))
    assert got["transactions"] == tx.num_rows and got["last_day"] < "2019-01-01"
    with pytest.raises(ValueError, match="no transaction before 1990-01-01"):
        drops.cut(root, str(tmp_path / "none"), "1990-01-01")
