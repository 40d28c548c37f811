"""Per-epoch validation against a naive ranking, with and without the customer's bought articles; model
selection by the best validation and early stopping."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import train_in_process

from data.jagged import Jagged
from trainer.evaluation.validation import validate


class TinyEmbedder:
    """What validate reads from an Embedder: the catalogue, the period's rows and their queries."""

    device = torch.device("cpu")

    def __init__(self, items, queries, targets, history=None, bonus=None, level=None):
        self.item_vectors, self.query_vectors, self.bonus, self.level = items, queries, bonus, level
        self.n_items = len(items)
        self.table = pa.table({"customer_idx": np.arange(len(queries)),
                               "targets": pa.array(targets, pa.list_(pa.int32())),
                               "history": pa.array(history or [[] for _ in targets], pa.list_(pa.int32()))})

    temperature = 0.05

    def repeat_bonus(self):
        return self.bonus

    def repeat_mixture(self):
        return self.level is not None

    def repeat_level(self, q, items):  # a level per query vector (the tests give each query its own)
        if self.level is None:
            return None
        rows = [int(np.flatnonzero((self.query_vectors == row).all(1))[0]) for row in q.numpy()]
        return self.level[rows]

    def as_queries(self, q, items, levels=True):
        from trainer.retrieval.ranker import Queries

        return Queries(q, self.repeat_level(q, items) if levels else None)

    def eval_rows(self, period):
        return self.table

    def items(self):
        return torch.from_numpy(self.item_vectors)

    def query_chunks(self, table, chunk=3):
        for lo in range(0, table.num_rows, chunk):
            rows = np.arange(lo, min(lo + chunk, table.num_rows))
            yield rows, torch.from_numpy(self.query_vectors[rows])


def naive_recall(items, queries, targets, k, seen=None, history=None, bonus=None, level=None, t=0.05):
    out = []
    for i, q in enumerate(queries):
        scores = items @ q
        scores[0] = -np.inf
        for s in (seen[i] if seen else []):
            scores[s] = -np.inf
        if bonus is not None:  # the p-th newest article of the history gets bonus[p] (the newest copy counts)
            newest = list(dict.fromkeys(reversed(history[i])))
            recent = list(reversed(history[i]))[:len(bonus)]
            for item in newest:
                if item in recent and item > 0:
                    b = bonus[recent.index(item)]
                    scores[item] = (scores[item] + b if level is None
                                    else t * np.logaddexp(scores[item] / t, (b + level[i]) / t))
        top = set(np.argsort(-scores, kind="stable")[:k].tolist())
        out.append(len(top & set(targets[i])) / len(targets[i]))
    return float(np.mean(out))


def test_validation_matches_a_naive_ranking_with_and_without_seen_articles():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(60, 8)).astype(np.float32)
    queries = rng.normal(size=(10, 8)).astype(np.float32)
    targets = [list(rng.choice(np.arange(1, 60), 3, replace=False)) for _ in range(10)]
    seen = [list(rng.choice(np.arange(1, 60), 5, replace=False)) for _ in range(10)]
    emb = TinyEmbedder(items, queries, targets)
    plain = validate(emb, [5, 10])
    assert plain["recall@5"] == pytest.approx(naive_recall(items, queries, targets, 5))
    excl = validate(emb, [5, 10], seen=Jagged.from_lists(seen))
    assert excl["recall@10"] == pytest.approx(naive_recall(items, queries, targets, 10, seen))
    assert {"ndcg@5", "ndcg@10", "map@12", "mrr"} <= set(excl)


def test_validation_gives_the_customers_own_last_articles_their_repeat_bonus():
    rng = np.random.default_rng(3)
    items = rng.normal(size=(60, 8)).astype(np.float32)
    queries = rng.normal(size=(12, 8)).astype(np.float32)
    history = [list(rng.integers(0, 60, rng.integers(0, 9))) for _ in range(12)]
    # targets: mostly the customers' own recent articles, so the bonus changes the recall
    targets = [list({*(h[-2:] if h else [1]), int(rng.integers(1, 60))} - {0}) or [1] for h in history]
    bonus = np.array([3.0, 2.0, 1.0], np.float32)
    with_bonus = validate(TinyEmbedder(items, queries, targets, history, bonus), [5])
    without = validate(TinyEmbedder(items, queries, targets, history), [5])
    assert with_bonus["recall@5"] == pytest.approx(naive_recall(items, queries, targets, 5, history=history,
                                                                bonus=bonus))
    assert without["recall@5"] == pytest.approx(naive_recall(items, queries, targets, 5))
    assert with_bonus["recall@5"] > without["recall@5"]
    # the mixture: a level per customer (trainer/model/repeats.py); low levels leave the towers' ranking
    level = np.where(np.arange(12) % 2 == 0, 1.0, -3.0).astype(np.float32)
    mixed = validate(TinyEmbedder(items, queries, targets, history, bonus - 2.0, level), [5])
    assert mixed["recall@5"] == pytest.approx(naive_recall(items, queries, targets, 5, history=history,
                                                           bonus=bonus - 2.0, level=level))
    assert mixed["recall@5"] != pytest.approx(with_bonus["recall@5"])


def test_best_checkpoint_and_early_stopping(tiny_prepared, tmp_path):
    """Nothing learns (learning rates 0), so the first validation stays the best: patience 1 stops the
    run after the second epoch of four, and export with checkpoint=best loads the first epoch's step."""
    from omegaconf import OmegaConf

    from trainer.export import export
    from trainer.parallel import distributed as D

    prepared, _ = tiny_prepared
    out = train_in_process(prepared, tmp_path / "train", "trainer.epochs=4", "trainer.patience=1", "optim.lr=0",
                           "sharding.fused_lr=0", "trainer.keep_checkpoints=1", "trainer.validate_exclude_seen=true")
    assert out["epoch"] == 2 and len(out["val"]) == 2
    first = out["val"][0]["step"]
    assert out["best"]["step"] == first and out["best"]["metric"] == "recall@12"
    written = export(OmegaConf.create({"train_dir": str(tmp_path / "train"), "checkpoint": "best"}),
                     str(tmp_path / "export"))
    D.shutdown()
    assert written["step"] == first  # kept through keep_checkpoints=1: the best is never rotated out


def test_recommend_leaves_out_bought_articles(tiny_prepared, tmp_path):
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    from data.io import read_customers, read_json
    from trainer.parallel import distributed as D
    from trainer.recommend import recommend

    prepared, manifest = tiny_prepared
    train_in_process(prepared, tmp_path / "train", "trainer.max_steps=30", "trainer.validate=false")
    root = read_json(f"{prepared}/manifest.json")["root"]
    customers = read_customers(root)["customer_id"].to_pylist()[:60]
    tx = pq.read_table(f"{root}/transactions", columns=["customer_id", "article_id"]).to_pylist()
    bought = {}
    for row in tx:
        bought.setdefault(row["customer_id"], set()).add(row["article_id"])
    got = {}
    for exclude in (False, True):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(config_name="recommend", overrides=[
                f"train_dir={tmp_path / 'train'}", "index_dir=null", f"run_dir={tmp_path / f'rec-{exclude}'}",
                f"recommend.customers={customers}", f"recommend.exclude_seen={str(exclude).lower()}"])
        (tmp_path / f"rec-{exclude}").mkdir()
        got[exclude] = recommend(cfg, str(tmp_path / f"rec-{exclude}"))["recommendations"]
        D.shutdown()
    overlap = lambda recs: sum(len(set(r) & bought.get(c, set())) for c, r in recs.items())  # noqa: E731
    assert overlap(got[False]) > 0  # the model does rank bought articles high ...
    assert overlap(got[True]) == 0  # ... and exclude_seen leaves every one of them out


def test_a_select_metric_validation_does_not_report_fails_before_training():
    """The names Validator accepts are the names validation's metrics carry (trainer/evaluation/metrics.py
    at trainer.recall_k); any other fails when the run starts, not after its first epoch."""
    from types import SimpleNamespace

    from trainer.evaluation.metrics import evaluate
    from trainer.loop.validator import Validator, validation_metrics

    reported = evaluate(np.array([[1, 2, 3]]), Jagged.from_lists([[2]]), ks=(12, 100), catalog_size=10)
    assert set(validation_metrics([12, 100])) == set(reported) - {"queries", "skipped_empty_truth"}
    loop = SimpleNamespace(validate=True, recall_k=[12, 100], select_metric="recal@12")
    with pytest.raises(ValueError, match="'recal@12' is not a validation metric"):
        Validator(loop, None, None, None, None, 0)
    Validator(SimpleNamespace(validate=True, recall_k=[12, 100], select_metric="ndcg@100"), None, None, None, None, 0)
