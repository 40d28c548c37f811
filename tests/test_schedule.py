"""The learning-rate schedule: its factor by hand, and the rate reaching both optimisers of a real run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from tests.conftest import train_in_process
from trainer.loop.schedule import LRSchedule, factor, stalls


def test_warmup_then_linear_decay_by_hand():
    # warm-up over 4 steps: 1/5 .. 4/5; then from 1 at step 4 down to 0.1 at the last step (13)
    got = [factor(s, 14, 4, "linear", 0.1) for s in range(14)]
    assert got[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert got[9] == pytest.approx(0.1 + 0.9 * (1 - 5 / 9))
    assert got[13] == pytest.approx(0.1)
    assert factor(20, 14, 4, "linear", 0.1) == pytest.approx(0.1)  # past the end: the floor


def test_cosine_decay_by_hand():
    # no warm-up, 13 steps: the cosine's middle (step 6 of 0..12) is half-way to the floor
    assert factor(0, 13, 0, "cosine", 0.0) == 1.0
    assert factor(6, 13, 0, "cosine", 0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert factor(3, 13, 0, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 12)))
    assert factor(12, 13, 0, "cosine", 0.0) == pytest.approx(0.0)
    assert factor(5, 1, 0, "cosine", 0.3) == pytest.approx(0.3)  # a one-step run: the floor, no division by 0


def test_plateau_halves_per_validation_without_a_new_best():
    """By hand: recall 0.2, 0.3 (new best), 0.25 (stall), 0.3 (ties the best: a stall), 0.35 (best),
    0.1 (stall) -> 3 stalls; the factor is 0.5 per stall, floored at min_lr_ratio, after the warm-up."""
    history = [{"recall@12": v} for v in (0.2, 0.3, 0.25, 0.3, 0.35, 0.1)]
    assert [stalls(history[:n], "recall@12") for n in range(1, 7)] == [0, 0, 1, 2, 2, 3]
    assert stalls(history, "map@12") == 0  # another metric: none recorded
    assert factor(50, 100, 0, "plateau", 0.0, stalls=3) == pytest.approx(0.125)
    assert factor(50, 100, 0, "plateau", 0.2, stalls=3) == pytest.approx(0.2)
    assert factor(50, 100, 0, "plateau", 0.0, stalls=2, plateau_factor=0.3) == pytest.approx(0.09)
    assert factor(1, 100, 4, "plateau", 0.0, stalls=3) == pytest.approx(0.4)  # warm-up first


def test_constant_without_warmup_or_decay():
    assert all(factor(s, 10, 0, "none", 0.0) == 1.0 for s in range(10))


@pytest.mark.parametrize("bad, match", [(dict(warmup_steps=-1), "warmup_steps"),
                                        (dict(min_lr_ratio=1.5), "min_lr_ratio"),
                                        (dict(plateau_factor=0.0), "plateau_factor")])
def test_bad_settings_are_named(bad, match):
    cfg = SimpleNamespace(**{**dict(lr=1e-3, warmup_steps=0, decay="none", min_lr_ratio=0.0, plateau_factor=0.5),
                             **bad})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match=match):
        LRSchedule(cfg, 0.05, opt, opt, 10)


def _weights(model) -> dict:
    out = {}
    for k, v in model.state_dict().items():
        t = v.local_shards()[0].tensor if isinstance(v, ShardedTensor) else v
        if t.is_floating_point():
            out[k] = t.detach().clone()
    return out


def _first_step_update(prepared: str, run_dir, *overrides: str) -> dict:
    """What one training step changes in every weight (tables and MLPs), from the same start."""
    seen = {}

    def before(trainer):
        seen["trainer"], seen["before"] = trainer, _weights(trainer.built.model)

    train_in_process(prepared, run_dir, "trainer.max_steps=1", "trainer.validate=false", *overrides,
                     before_fit=before)
    after = _weights(seen["trainer"].built.model)
    return {k: after[k] - seen["before"][k] for k in after}


def test_the_rate_reaches_the_tables_and_the_mlps(tiny_prepared, tmp_path):
    """Warm-up over 3 steps makes step 0 run at a quarter of the base rates. On a first step both
    optimisers move each weight by the rate times a function of its gradient alone (row-wise Adagrad:
    lr * g / sqrt(mean g^2); AdamW: lr * g / |g|), so every update is a quarter of the plain run's."""
    prepared, _ = tiny_prepared
    plain = _first_step_update(prepared, tmp_path / "plain", "optim.decay=none")
    warm = _first_step_update(prepared, tmp_path / "warm", "optim.decay=none", "optim.warmup_steps=3")
    tables = [k for k in plain if "embedding_bags" in k]
    mlps = [k for k in plain if "tower" in k]
    assert tables and mlps
    for k in tables + mlps:
        # a difference of two float32 weights is exact to a few units in the weight's last place
        assert torch.allclose(warm[k], 0.25 * plain[k], rtol=0, atol=1e-6), k
        assert (plain[k].abs() > 1e-4).any(), k  # every weight moved, visibly
        assert not torch.allclose(warm[k], plain[k], rtol=0, atol=1e-6), k


def test_the_loop_applies_the_plateau_factor_of_its_validation_history(tiny_prepared, tmp_path):
    """A run whose history holds three validations, two without a new best (0.3, then 0.2 and 0.1), trains
    its next step at a quarter of the base rates."""
    prepared, _ = tiny_prepared
    seen = {}

    def before(trainer):
        trainer.state.history["val"] = [{"step": 0, "epoch": 0, "map@12": v} for v in (0.3, 0.2, 0.1)]
        seen["t"] = trainer

    train_in_process(prepared, tmp_path, "trainer.max_steps=1", "trainer.validate=false", "optim.decay=plateau",
                     "trainer.select_metric=map@12", before_fit=before)
    assert seen["t"].parts.schedule.lr() == pytest.approx(1e-3 * 0.25)
