"""Managed ids (trainer/model/managed.py): TorchRec's MCH maps in front of the sharded tables.

The map is checked against a naive LFU written here (a dict of held ids and their counts), its state
against an uninterrupted twin, the reset of evicted rows against the tables before, and a training run
with managed tables end to end (warm start, evaluation, bundle)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import build_bundle, compose_train, train_in_process
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.model.managed import ManagedIds
from trainer.parallel import distributed as D

MANAGED = ["model.ids=managed", "model.managed.customer_rows=600", "model.managed.article_rows=200",
           "model.managed.eviction_interval=5"]


def kjt(**features: list[int]) -> KeyedJaggedTensor:
    """One id per row for every feature (the rows of the batch)."""
    keys = list(features)
    values = torch.tensor([v for k in keys for v in features[k]], dtype=torch.int64)
    lengths = torch.ones(len(values), dtype=torch.int32)
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths,
                             length_per_key=[len(features[k]) for k in keys])


def managed(rows: int, interval: int, batch: int) -> ManagedIds:
    m = ManagedIds({"t": rows}, {"t": ["a", "h"]}, {"t": "a"}, "lfu", interval, batch, 0, torch.device("cpu"))
    m.train()
    return m


class NaiveLFU:
    """What LFU admission means, by hand: every ``interval`` steps the ids seen since are counted; a held
    id's count grows by its new sightings, and the ``rows - 1`` ids with the highest counts are held (a
    held id keeps its place against a newcomer of the same count; newcomers tie by id)."""

    def __init__(self, rows: int, interval: int):
        self.slots, self.interval, self.held, self.window, self.steps = rows - 1, interval, {}, Counter(), 0

    def step(self, ids: list[int]) -> None:
        self.window.update(ids)
        self.steps += 1
        if self.steps % self.interval:
            return
        for i in self.held:
            self.held[i] += self.window.pop(i, 0)
        held = sorted(self.held.items(), key=lambda kv: -kv[1])  # stable: held first on ties
        new = sorted(self.window.items(), key=lambda kv: (-kv[1], kv[0]))
        ranked = sorted(held + new, key=lambda kv: -kv[1])[:self.slots]  # held before new on equal counts
        self.held, self.window = dict(ranked), Counter()


def test_the_map_holds_the_ids_a_naive_lfu_holds_and_keeps_a_held_ids_row():
    rng = np.random.default_rng(3)
    rows, interval, batch = 9, 3, 16
    m, ref = managed(rows, interval, batch), NaiveLFU(rows, interval)
    row_of: dict[int, int] = {}
    for step in range(40):
        # ids drift: a few popular ones, a tail that moves with the step
        ids = np.where(rng.random(batch) < 0.5, rng.integers(0, 4, batch), rng.integers(step, step + 30, batch))
        out = m(kjt(a=ids.tolist(), h=[7, 100_000]), batch)
        ref.step(ids.tolist())
        held = sorted(ref.held)
        got = m.map("t", torch.tensor(held)).tolist()
        assert sorted(got) == sorted(set(got)) and all(0 <= r < rows - 1 for r in got), got  # distinct rows
        for i, r in zip(held, got):
            assert row_of.setdefault(i, r) == r, f"id {i} moved from row {row_of[i]} to {r} while held"
        for gone in set(row_of) - set(held):
            del row_of[gone]
        outside = [i for i in range(0, 200) if i not in ref.held]
        assert set(m.map("t", torch.tensor(outside)).tolist()) == {rows - 1}  # the shared row
        # every feature of the table is mapped, the recorded one and the others alike
        assert out.values().tolist() == m.map("t", torch.tensor([*ids.tolist(), 7, 100_000])).tolist()
    assert len(ref.held) == rows - 1


def test_a_map_saved_between_admissions_continues_as_the_uninterrupted_one():
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, 60, 16).tolist() for _ in range(23)]
    straight = managed(12, 5, 16)
    for ids in batches:
        straight(kjt(a=ids), 16)
    first = managed(12, 5, 16)
    for ids in batches[:13]:  # 3 steps into an interval
        first(kjt(a=ids), 16)
    resumed = managed(12, 5, 16)
    resumed.load_state_dict(first.state_dict())
    for ids in batches[13:]:
        resumed(kjt(a=ids), 16)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    probe = torch.arange(60)
    assert torch.equal(straight.map("t", probe), resumed.map("t", probe))
    # without the recorded ids in the state, the resumed map would differ (the test can fail)
    lost = managed(12, 5, 16)
    state = first.state_dict()
    state = {k: (torch.zeros_like(v) if k.endswith("_history_accumulator") else v) for k, v in state.items()}
    lost.load_state_dict(state)
    for ids in batches[13:]:
        lost(kjt(a=ids), 16)
    assert not torch.equal(straight.map("t", probe), lost.map("t", probe))


def test_evicted_rows_start_over_and_the_rest_stay(tiny_prepared, tmp_path):
    from trainer.loop.builder import build
    from trainer.model.towers import unwrap
    from data.prepared import Prepared
    from trainer.parallel.sharding import reset_rows

    prepared, _ = tiny_prepared
    cfg = compose_train(prepared, tmp_path, *MANAGED)
    D.init("cpu")
    try:
        built = build(cfg, Prepared.read(prepared), torch.device("cpu"), print_plan=False)
        model = unwrap(built.model)
        config = {t.name: t for t in model.tables}["t_customer_id"]
        assert config.num_embeddings == 600
        weight = next(v for k, v in built.model.state_dict().items() if k.endswith("t_customer_id.weight"))
        weight = weight.local_shards()[0].tensor if hasattr(weight, "local_shards") else weight
        state = next(s for s in built.fused_optimizer.state_dict()["state"].values()
                     if any(k.startswith("t_customer_id.") for k in s))
        momentum = next(v for k, v in state.items() if k.startswith("t_customer_id."))
        momentum = momentum.local_shards()[0].tensor if hasattr(momentum, "local_shards") else momentum
        momentum.fill_(0.5)
        before = weight.clone()
        rows = torch.tensor([3, 17, 599])
        reset_rows(built.model, config, rows, seed=0, step=10)
        others = torch.ones(600, dtype=torch.bool)
        others[rows] = False
        assert torch.equal(weight[others], before[others])
        assert not torch.equal(weight[rows], before[rows])
        bound = config.get_weight_init_max()
        assert float(weight[rows].abs().max()) <= bound
        assert torch.all(momentum.reshape(600, -1)[rows] == 0) and torch.all(momentum.reshape(600, -1)[others] == 0.5)
    finally:
        D.shutdown()


def test_managed_needs_its_sizes_and_no_pipeline(tiny_prepared, tmp_path):
    from trainer.config import Pipeline
    from trainer.loop.pipeline import use_pipeline
    from trainer.model.towers import table_configs

    prepared, _ = tiny_prepared
    cfg = compose_train(prepared, tmp_path, "model.ids=managed", "model.managed.customer_rows=600")
    with pytest.raises(ValueError, match="model.managed.article_rows"):
        table_configs(cfg.model, {"customer_id": 2001, "article_id": 501, **{f: 10 for f in [
            "age_bucket", "club_status", "news_freq", "postal_code", "product_type", "product_group",
            "colour_group", "department", "index", "section", "garment_group", "desc_tokens"]}})
    with pytest.raises(ValueError, match="model.ids=managed"):
        use_pipeline(Pipeline.on, False, torch.device("cpu"), 2, managed=True)
    assert not use_pipeline(Pipeline.auto, False, torch.device("cpu"), 2, managed=True)


def test_a_managed_run_warm_starts_unchanged_in_size_and_serves_what_evaluation_measured(tiny_drops, tmp_path):
    """Week 1 trains with managed tables; week 2 (more customers and articles in the vocabulary) warm-starts
    from it: the same table sizes, the parent's rows and maps bit for bit before the first step; trained, its
    bundle's query vectors are the evaluation's (the served tables read through the map)."""
    from test_warm_start import saved_state, started, whole

    from trainer.loop.runs import load_run

    first, second = tiny_drops["first"], tiny_drops["second"]
    assert second.cardinalities["customer_id"] > first.cardinalities["customer_id"]
    parent, child = tmp_path / "parent", tmp_path / "child"
    train_in_process(first.url, parent, *MANAGED, "trainer.max_steps=24", "trainer.validate=false")
    saved = saved_state(parent)
    assert int(saved["model.managed.progress"][:, 2].min()) == 24  # both maps recorded every step
    try:
        warm = started(second.url, child, *MANAGED, f"trainer.init_from={parent}")
        model = {k: whole(v) for k, v in warm.built.model.state_dict().items()}
    finally:
        D.shutdown()
    for table, rows in (("t_customer_id", 600), ("t_article", 200)):
        assert model[f"ebc.embedding_bags.{table}.weight"].shape[0] == rows  # not grown with the vocabulary
    for key, ours in model.items():
        assert torch.equal(ours, saved[f"model.{key}"]), key
    held = saved["model.managed.maps.t_customer_id._mch_sorted_raw_ids"]
    assert int((held < torch.iinfo(torch.int64).max).sum()) > 100  # the parent admitted customers

    train_in_process(second.url, child, *MANAGED, f"trainer.init_from={parent}", "trainer.max_steps=12",
                     "trainer.validate=false")
    embedder, _ = load_run(str(child), "latest")
    try:
        day = int(np.unique(embedder.eval_rows("val")["day"].to_numpy())[0])
        customers, queries = embedder.eval_queries("val")
    finally:
        D.shutdown()
    from trainer.serving.bundle import Bundle

    build_bundle(child, tmp_path / "bundle", f"bundle.as_of={np.datetime64(day, 'D')}", "bundle.int8=false")
    b = Bundle.load(str(tmp_path / "bundle" / "output"))
    q, _ = b.queries(customers, b.history.take(customers))
    assert np.allclose(q, queries.numpy(), atol=1e-5)
