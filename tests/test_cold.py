"""New articles from their features (trainer/model/cold.py): id dropout in training, the feature-only path at
scoring time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import train_in_process

from data.batch import packed_from_arrays
from trainer.model.cold import IdDropout, cold_articles, scoring_ids, training_sales


def test_id_dropout_drops_a_share_of_articles_the_same_in_every_row_and_on_every_rank():
    drop = IdDropout(0.25, seed=3)
    articles = np.arange(1, 20_001)
    out = drop(0, 7, articles)
    dropped = out == 0
    assert abs(dropped.mean() - 0.25) < 0.01
    assert np.array_equal(out[~dropped], articles[~dropped])
    # an article's fate is one per (epoch, batch): wherever it stands, whatever rows come with it (a rank's share)
    shuffled = np.random.default_rng(0).permutation(articles)
    assert np.array_equal(drop(0, 7, shuffled) == 0, dropped[shuffled - 1])
    assert np.array_equal(drop(0, 7, articles[5000:6000]), out[5000:6000])
    assert not np.array_equal(drop(0, 8, articles) == 0, dropped)  # another batch, other articles
    assert not np.array_equal(IdDropout(0.25, seed=4)(0, 7, articles) == 0, dropped)
    assert np.array_equal(IdDropout(0.0, 3)(0, 7, articles), articles)


def test_cold_articles_are_those_sold_fewer_times_than_the_threshold(tiny_prepared):
    prepared, manifest = tiny_prepared
    n = manifest["cardinalities"]["article_id"]
    sold = training_sales(prepared, n)
    import pyarrow.parquet as pq
    ex = pq.read_table(f"{prepared}/examples", columns=["article_idx"])["article_idx"].to_numpy()
    assert np.array_equal(sold, np.bincount(ex, minlength=n))  # no train_days window: examples are training
    cold = cold_articles(prepared, n, 3)
    assert np.array_equal(cold[1:], sold[1:] < 3) and not cold[0]
    assert not cold_articles(prepared, n, 0).any()
    ids = np.array([0, 1, 2, 3])
    assert np.array_equal(scoring_ids(ids, cold), np.where(cold[ids], 0, ids))


def test_a_cold_articles_vector_is_the_item_tower_on_its_features_without_its_id(tiny_prepared, tmp_path):
    """Trained with id dropout; scored with cold_start_sales: the Embedder's vector of a cold article is the
    item tower run on that article's features with the OOV id, and a warm one's is by its own id."""
    from trainer.loop.runs import load_run
    from trainer.parallel import distributed as D

    prepared, manifest = tiny_prepared
    train_in_process(prepared, tmp_path / "train", "trainer.max_steps=20", "trainer.validate=false",
                     "model.id_dropout=0.2", "model.cold_start_sales=5")
    D.shutdown()
    try:
        emb, _ = load_run(str(tmp_path / "train"), "latest")
        items = emb.items(scoring=False)
        cold = np.flatnonzero(emb.cold)
        warm = np.flatnonzero(~emb.cold)[1:6]
        assert len(cold) > 0
        arts = np.r_[cold[:5], warm]
        for ids in (np.zeros(len(arts), np.int64), arts):
            batch = packed_from_arrays(emb.tables, np.zeros(len(arts)), arts, np.full(len(arts), emb.last_day),
                                       item_ids=ids)
            vectors = emb._forward(batch)[1]
            by_id = ids.astype(bool)
            if not by_id.any():  # every article embedded without its id: the cold ones are these
                assert torch.allclose(items[cold[:5]], vectors[:5], atol=1e-6)
                assert not torch.allclose(items[warm], vectors[5:], atol=1e-3)
            else:
                assert torch.allclose(items[warm], vectors[5:], atol=1e-6)
    finally:
        D.shutdown()


@pytest.mark.parametrize("rate", [0.5])
def test_the_stream_hands_the_item_tower_the_dropped_ids_and_the_loss_the_real_ones(tiny_prepared, rate):
    from data.stream import ExampleStream

    prepared, _ = tiny_prepared
    drop = IdDropout(rate, seed=0)
    s = ExampleStream(prepared, 256, seed=0, item_ids=drop, extra_rows=lambda e, b: np.arange(1, 65))
    s.set_epoch(0)
    batch = next(iter(s))
    real = batch.article_idx.numpy()
    fed = batch.item["article_id"].values().numpy()
    assert np.array_equal(fed, drop(0, 0, real)) and (fed == 0).any() and (real != 0).all()
    assert np.array_equal(batch.extra_item["article_id"].values().numpy(), drop(0, 0, np.arange(1, 65)))
    assert np.array_equal(batch.extra_ids.numpy(), np.arange(1, 65))


def test_a_purchase_of_an_article_fresh_on_the_shelf_enters_without_its_id():
    first = np.array([-1, 100, 90, 50, 103])
    drop = IdDropout(0.0, seed=0, first_sold=first, fresh_days=7)
    articles = np.array([1, 2, 3, 4, 1])
    days = np.array([103, 103, 103, 103, 107])
    assert drop(0, 0, articles, days).tolist() == [0, 2, 3, 0, 1]  # 1 first sold 3 days before; 4 that day
    assert drop(0, 0, articles).tolist() == articles.tolist()  # item-only rows (no day): by rate alone
