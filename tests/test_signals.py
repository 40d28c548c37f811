"""trainer/model/signals.py: what the model's settings resolve to on hand-made manifests."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from data.prepared import Prepared
from trainer.config import ModelConfig
from trainer.model.signals import follow_data


def prepared(first: str, last: str, order: str = "time", within_day: bool = False) -> Prepared:
    return Prepared.from_manifest("mem://p", {
        "root": "mem://d", "cardinalities": {"customer_id": 3, "article_id": 4}, "customer_features": [],
        "article_features": [], "history_len": 5, "history_within_day": within_day, "history_order": order,
        "split": {"protocol": "week", "first_day": first, "last_day": last}})


@pytest.mark.parametrize("first,last,order,within_day,encoder,time_terms", [
    ("2020-01-01", "2020-03-01", "time", False, "transformer", True),  # H&M-like: ordered, many days
    ("2020-01-01", "2020-03-01", "none", False, "bag", True),  # histories sampled without order
    ("2020-01-01", "2020-01-01", "time", False, "bag", False),  # one day, one basket: no order at all
    ("2020-01-01", "2020-01-01", "time", True, "transformer", False),  # one day of ordered sessions
])
def test_auto_encoder_and_time_terms_follow_the_data(first, last, order, within_day, encoder, time_terms):
    cfg = OmegaConf.structured(ModelConfig())
    notes = follow_data(cfg, prepared(first, last, order, within_day))
    assert cfg.history_encoder == encoder and any(f"auto: {encoder}" in n for n in notes)
    assert cfg.time_features == time_terms and (cfg.recent_sales_buckets > 0) == time_terms
    assert len(notes) == (1 if time_terms else 3)


def test_a_chosen_encoder_is_kept():
    cfg = OmegaConf.structured(ModelConfig(history_encoder="transformer"))
    assert follow_data(cfg, prepared("2020-01-01", "2020-03-01", "none")) == []
    assert cfg.history_encoder == "transformer"
