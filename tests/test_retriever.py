"""One retrieval path (trainer/retrieval/retriever.py): validation, evaluate (exact, and through the IVF index at
nprobe = nlist) and recommend (as of the validation day) return the same top-k for the same customers
as a naive reference that scores every article of the catalogue, with and without bought articles left
out (without: the customer's own last articles carry the learned buying-again term)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import CONF, train_in_process
from omegaconf import OmegaConf

K = 12


def naive_top_k(items: np.ndarray, queries: np.ndarray, k: int, seen=None, history=None, bonus=None,
                level=None, t: float = 0.05) -> list[list[int]]:
    """Every article scored for every customer: the inner product; -inf for the OOV row and what was bought;
    the article of the p-th newest purchase scored as the mixture with bonus[p] + level."""
    out = []
    for i, q in enumerate(queries):
        scores = items.astype(np.float64) @ q.astype(np.float64)
        scores[0] = -np.inf
        for s in (seen[i] if seen is not None else []):
            scores[s] = -np.inf
        if bonus is not None:
            last = list(reversed(history[i]))[:len(bonus)]  # the last purchases, newest first
            for p, a in enumerate(last):
                if a > 0 and a not in last[:p]:  # an article bought again counts at its newest position
                    scores[a] = t * np.logaddexp(scores[a] / t, (bonus[p] + level[i]) / t)
        out.append(np.argsort(-scores, kind="stable")[:k].tolist())
    return out


def agree(got, want) -> float:
    """Share of customers whose top-k equals the reference's, as sets (an exact float tie may order
    either way; none expected)."""
    return float(np.mean([set(g) == set(w) for g, w in zip(got, want)]))


@pytest.fixture(scope="module")
def trained(tiny_prepared, tmp_path_factory):
    from trainer.evaluation.purchases import training_purchases
    from trainer.retrieval.search import list_column
    from trainer.export import export
    from trainer.parallel import distributed as D
    from trainer.loop.runs import load_run

    prepared, _ = tiny_prepared
    base = tmp_path_factory.mktemp("retriever")
    train_in_process(prepared, base / "train", "trainer.max_steps=40", "trainer.validate=false")
    export(OmegaConf.create({"train_dir": str(base / "train"), "checkpoint": "latest"}), str(base / "export"))
    D.shutdown()
    embedder, _ = load_run(str(base / "train"), "latest")
    table = embedder.eval_rows("val")
    customers, queries = embedder.eval_queries("val")
    items = embedder.items()
    history_lists = list_column(table, "history")
    history = [history_lists.row(i).tolist() for i in range(table.num_rows)]  # plain lists for the reference
    seen_lists = training_purchases(prepared, customers)
    seen = [seen_lists.row(i).tolist() for i in range(table.num_rows)]
    level = embedder.repeat_level(queries, items)
    bonus = embedder.repeat_bonus()
    assert bonus is not None and level is not None  # the defaults: buying again as the mixture
    ref = {False: naive_top_k(items.numpy(), queries.numpy(), K, history=history, bonus=bonus, level=level,
                              t=embedder.temperature),
           True: naive_top_k(items.numpy(), queries.numpy(), K, seen=seen)}
    return {"base": base, "prepared": prepared, "embedder": embedder, "table": table, "customers": customers,
            "queries": queries.numpy(), "items": items.numpy(), "history": history_lists,
            "seen": seen_lists, "ref": ref}


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_validation_ranks_as_the_naive_reference(trained, exclude_seen):
    from trainer.evaluation.validation import ranking

    got = ranking(trained["embedder"], trained["table"], K, seen=trained["seen"] if exclude_seen else None)
    assert agree(got.tolist(), trained["ref"][exclude_seen]) == 1.0


@pytest.mark.parametrize("exclude_seen", [False, True])
@pytest.mark.parametrize("through", ["exact", "IVF at nprobe = nlist"])
def test_evaluate_ranks_as_the_naive_reference(trained, exclude_seen, through):
    from data.io import read_json
    from data.staging import output_of
    from trainer.evaluate import model_ranking
    from trainer.retrieval import ivf as ix

    export_dir, index_dir = str(trained["base"] / "export"), None
    if through != "exact":
        index_dir = str(trained["base"] / "index")
        art_idx, vectors = ix.read_embeddings(f"{output_of(export_dir)}/items.parquet", "article_idx")
        ids = ix.read_table(f"{output_of(export_dir)}/items.parquet")["article_id"].to_numpy()
        index = ix.build(vectors[art_idx > 0], "ivf_flat", nlist=8)
        index.nprobe = 8  # every list: an exhaustive search
        ix.save(index, ids[art_idx > 0], index_dir,
                {"nprobe": 8, "export": read_json(f"{output_of(export_dir)}/export_report.json")})
    got, how = model_ranking(export_dir, trained["customers"], index_dir, K, "val",
                             seen=trained["seen"] if exclude_seen else None, history=trained["history"])
    assert how.startswith("IVF (nprobe 8)" if index_dir else "exact")
    assert agree(got.tolist(), trained["ref"][exclude_seen]) == 1.0


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_recommend_as_of_the_validation_day_ranks_as_the_naive_reference(trained, tmp_path, exclude_seen):
    from hydra import compose, initialize_config_dir

    from data import vocab
    from trainer.parallel import distributed as D
    from trainer.recommend import recommend

    table, prepared = trained["table"], trained["prepared"]
    days = np.unique(table["day"].to_numpy())
    assert len(days) == 1  # the week split: every validation customer as of the week's first day
    warm = np.flatnonzero(trained["history"].lengths() > 0)  # customers without a history get the popular articles
    ids = vocab.load(prepared, "customer_id")["value"].take(pa.array(trained["customers"][warm] - 1)).to_pylist()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="recommend", overrides=[
            f"train_dir={trained['base'] / 'train'}", "index_dir=null", "checkpoint=latest", f"run_dir={tmp_path}",
            f"recommend.customers={ids}", f"recommend.exclude_seen={str(exclude_seen).lower()}",
            f"recommend.k={K}", f"recommend.as_of={np.datetime64(int(days[0]), 'D')}"])
    try:
        got = recommend(cfg, str(tmp_path))["recommendations"]
    finally:
        D.shutdown()
    art_ids = np.r_[-1, vocab.load(prepared, "article_id")["value"].to_numpy()]
    want = [art_ids[trained["ref"][exclude_seen][i]].tolist() for i in warm]
    assert agree([got[c] for c in ids], want) == 1.0


def test_the_ranker_through_an_index_leaves_out_any_number_of_bought_articles():
    """Bought lists longer than any fixed margin (300 of the query's top articles): through an exact FAISS
    index the ranker still returns the k best articles not bought, as a naive full sort does."""
    import faiss

    from data.jagged import Jagged
    from trainer.retrieval.ranker import Queries, Ranker

    rng = np.random.default_rng(0)
    items = rng.normal(size=(2001, 8)).astype(np.float32)
    items[0] = 0
    q = rng.normal(size=(5, 8)).astype(np.float32)
    index = faiss.IndexFlatIP(8)
    index.add(items[1:])

    def search(x, width):
        found = index.search(x, width)[1]
        return np.where(found >= 0, found + 1, -1)

    order = np.argsort(-(q @ items[1:].T), axis=1) + 1
    seen = Jagged.from_lists([row[:300].tolist() for row in order])  # the 300 best of each: bought
    got = Ranker(items, search=search).top_k(Queries(q), 12, seen=seen)
    assert np.array_equal(got, order[:, 300:312])
    exact = Ranker(items).top_k(Queries(q), 12, seen=seen)
    assert np.array_equal(exact, got)


def test_the_retriever_and_the_bundle_rank_through_the_one_ranker(built):
    from conftest import load

    from trainer.retrieval.ranker import Ranker
    from trainer.retrieval.retriever import Retriever

    assert isinstance(Retriever(built["items"]).ranker, Ranker)
    b = load(built)
    assert isinstance(b._indexed, Ranker) and isinstance(b._exact, Ranker)
