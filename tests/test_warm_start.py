"""Warm starts (trainer/loop/warm_start.py): last week's run continued on this week's grown data.

The references are the parent's checkpoint read back whole by torch.distributed.checkpoint's own converter
(old rows, optimiser state) and a fresh run built with the same seed (new rows)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_train, prepare_drop, train_in_process
from test_invariance import assert_same_weights, losses, train
from test_train import final_weights
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from data.runinfo import start_run
from trainer.loop.checkpoint import CheckpointError
from trainer.parallel import distributed as D
from trainer.train import Trainer

TABLES = ("t_customer_id", "t_article", "t_product_type")


@pytest.fixture(scope="module")
def parent(tiny_drops, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("warm") / "parent"
    train_in_process(tiny_drops["first"].url, run_dir, "trainer.max_steps=20", "trainer.validate=false")
    return run_dir


def saved_state(run_dir) -> dict:
    """The newest checkpoint of a run, every part read back whole (DCP's converter), flattened."""
    steps = sorted((run_dir / "checkpoints").glob("step-*"))
    out = run_dir / "whole.pt"
    dcp_to_torch_save(str(steps[-1]), str(out))
    flat = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}{k}.", x)
        elif isinstance(v, torch.Tensor):
            flat[prefix[:-1]] = v
    walk("", torch.load(out, weights_only=True))
    return flat


def whole(t):
    """A table or state tensor of a one-rank run, as one tensor."""
    if isinstance(t, ShardedTensor):
        (shard,) = t.local_shards()
        return shard.tensor
    return t


def started(prepared: str, run_dir, *overrides: str) -> Trainer:
    """A trainer that has resumed or warm-started, before its first step."""
    cfg = compose_train(prepared, run_dir, "trainer.validate=false", *overrides)
    start_run(cfg)
    trainer = Trainer(cfg, str(run_dir), tensorboard=False)
    trainer._resume()
    return trainer


def test_a_warm_start_begins_with_the_parents_rows_and_a_fresh_runs_new_rows(tiny_drops, parent, tmp_path):
    first, second = tiny_drops["first"], tiny_drops["second"]
    saved = saved_state(parent)
    try:
        warm = started(second.url, tmp_path / "warm", f"trainer.init_from={parent}")
        model = {k: whole(v) for k, v in warm.built.model.state_dict().items()}
        fused = {k: whole(t) for v in warm.built.fused_optimizer.state_dict()["state"].values() for k, t in v.items()}
        dense = warm.built.dense_optimizer.state_dict()["state"]
        assert warm.parent["step"] == 20 and warm.parent["vocab_version"] == first.version
    finally:
        D.shutdown()
    try:
        fresh = started(second.url, tmp_path / "fresh")
        fresh_model = {k: whole(v).clone() for k, v in fresh.built.model.state_dict().items()}
    finally:
        D.shutdown()
    grown = 0
    for key, ours in model.items():
        theirs = saved[f"model.{key}"]
        n = theirs.shape[0]
        assert torch.equal(ours[:n], theirs), key  # bit for bit
        if ours.shape[0] > n:  # a grown table: its new rows are what a fresh run starts with
            grown += 1
            assert torch.equal(ours[n:], fresh_model[key][n:]), key
            assert not torch.equal(ours[:n], fresh_model[key][:n]), key  # (the parent did train them)
    assert grown >= 2  # customers and articles
    for table in ("t_customer_id", "t_article"):
        mom = fused[f"{table}.momentum1"]
        old = saved[f"fused_optimizer.ebc.embedding_bags.{table}.weight.{table}.momentum1"]
        assert torch.equal(mom[:len(old)], old) and old.abs().sum() > 0
        assert mom.shape[0] > len(old) and torch.all(mom[len(old):] == 0)  # new rows: empty state
    sq = dense["query_tower.0.weight"]["exp_avg_sq"]
    assert torch.equal(sq, saved["dense_optimizer.query_tower.0.weight.exp_avg_sq"])


def test_a_warm_start_without_the_optimisers_takes_the_weights_and_a_fresh_runs_state(tiny_drops, parent, tmp_path):
    """trainer.init_optimizer=false: the parent's weights, and the optimiser state a fresh run starts with
    (row-wise Adagrad's accumulators and Adam's step and moments all zero), not the parent's."""
    saved = saved_state(parent)
    try:
        warm = started(tiny_drops["second"].url, tmp_path / "warm", f"trainer.init_from={parent}",
                       "trainer.init_optimizer=false")
        model = {k: whole(v).clone() for k, v in warm.built.model.state_dict().items()}
        fused = {k: whole(t).clone() for v in warm.built.fused_optimizer.state_dict()["state"].values()
                 for k, t in v.items()}
        dense = warm.built.dense_optimizer.state_dict()["state"]
    finally:
        D.shutdown()
    table = model["ebc.embedding_bags.t_article.weight"]
    old = saved["model.ebc.embedding_bags.t_article.weight"]
    assert torch.equal(table[:len(old)], old)
    for name in ("t_customer_id", "t_article"):
        assert saved[f"fused_optimizer.ebc.embedding_bags.{name}.weight.{name}.momentum1"].abs().sum() > 0
        assert torch.all(fused[f"{name}.momentum1"] == 0), name
    assert saved["dense_optimizer.query_tower.0.weight.exp_avg"].abs().sum() > 0
    assert all(float(t.abs().sum()) == 0 for t in dense["query_tower.0.weight"].values())  # step 0, zero moments


def test_a_checkpoint_of_another_lineage_or_model_is_refused_by_name(tiny_drops, parent, tmp_path):
    afresh = prepare_drop(f"{tiny_drops['out']}/week-02", out=str(tmp_path / "afresh"))  # sorted anew: not grown
    with pytest.raises(CheckpointError, match=f"vocabulary version {tiny_drops['first'].version}, which is not in "
                                              f"the lineage of {afresh.url} \\({afresh.version}\\)"):
        try:
            started(afresh.url, tmp_path / "foreign", f"trainer.init_from={parent}")
        finally:
            D.shutdown()
    with pytest.raises(CheckpointError, match="model.output_dim: 64 \\(checkpoint\\) vs 32 \\(now\\)"):
        try:
            started(tiny_drops["second"].url, tmp_path / "other", f"trainer.init_from={parent}", "model.output_dim=32")
        finally:
            D.shutdown()


def test_resuming_a_warm_started_run_continues_it_and_the_record_names_the_parent(tiny_drops, parent, tmp_path):
    second, run_dir = tiny_drops["second"].url, tmp_path / "child"
    init = f"trainer.init_from={parent}"
    train_in_process(second, run_dir, init, "trainer.max_steps=6", "trainer.validate=false")
    ran = json.loads((run_dir / "metrics.json").read_text())
    out = train_in_process(second, run_dir, init, "trainer.max_steps=10", "trainer.validate=false")
    assert out["step"] == 10 and [t["step"] for t in out["train"]][-1] == 10
    assert ran["warm_start"] == out["warm_start"] and out["warm_start"]["train_dir"] == str(parent)
    info = json.loads(sorted((run_dir / "checkpoints").glob("step-*/run.json"))[-1].read_text())
    assert info["warm_start"]["step"] == 20 and info["data"]["version"] == tiny_drops["second"].version
    assert info["data"]["lineage"] == [tiny_drops["first"].version, tiny_drops["second"].version]
    assert out["examples_trained"] == 10 * 512


@pytest.mark.slow
def test_one_and_two_ranks_warm_start_the_same_training(tiny_drops, parent, tmp_path):
    """A parent saved by one rank starts 1 and 2 ranks alike, and they train the same model from it."""
    second = tiny_drops["second"].url
    common = [f"trainer.init_from={parent}", "trainer.max_steps=20", "trainer.validate=false", "optim.decay=cosine"]
    one = train(second, tmp_path / "one", 1, *common)
    two = train(second, tmp_path / "two", 2, *common)
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 20
    assert np.abs(a[:8] - b[:8]).max() < 2e-5, np.abs(a - b)
    assert np.abs(a - b).max() < 1e-2
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), 5e-2, False)


def test_a_warm_start_steps_at_its_share_of_the_rates(tiny_drops, parent, tmp_path):
    second = tiny_drops["second"]
    base = compose_train(second.url, tmp_path / "base")
    rates = {}
    for name, overrides in (("warm", [f"trainer.init_from={parent}"]), ("fresh", []),
                            ("full rates", [f"trainer.init_from={parent}", "trainer.init_lr_scale=1.0"])):
        try:
            t = started(second.url, tmp_path / name.replace(" ", "_"), *overrides)
            rates[name] = ([g["lr"] for g in t.built.dense_optimizer.param_groups],
                           [g["lr"] for g in t.built.fused_optimizer.param_groups])
        finally:
            D.shutdown()
    lr, fused = float(base.optim.lr), float(base.sharding.fused_lr)
    # the optimisers as the first step finds them (the parent's optimiser state loaded): a quarter by default
    assert rates["fresh"] == (pytest.approx([lr]), pytest.approx([fused] * len(rates["fresh"][1])))
    assert rates["warm"] == (pytest.approx([lr / 4]), pytest.approx([fused / 4] * len(rates["warm"][1])))
    assert rates["full rates"] == rates["fresh"]
