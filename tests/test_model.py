"""Model and sharding on one process: tables, shared article table, MF shape, constraint errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from trainer.config import ModelConfig, ShardingConfig
from trainer.inputs import join_rows
from trainer.model import ARTICLE_TABLE, TwoTower, table_configs
from trainer.sharding import check_constraints
from torchrec import KeyedJaggedTensor

CARDS = {"customer_id": 11, "age_bucket": 5, "club_status": 4, "news_freq": 4, "postal_code": 32, "article_id": 21,
         "product_type": 6, "product_group": 4, "colour_group": 7, "department": 9, "index": 5, "section": 6,
         "garment_group": 5, "desc_tokens": 64}


def test_history_shares_the_article_table():
    tables = {t.name: t for t in table_configs(OmegaConf.structured(ModelConfig()), CARDS)}
    assert tables[ARTICLE_TABLE].feature_names == ["history", "article_id"]
    assert tables[ARTICLE_TABLE].num_embeddings == 21 and tables["t_customer_id"].embedding_dim == 64
    assert tables["t_section"].embedding_dim == 16


def test_unknown_feature_is_named():
    cfg = OmegaConf.structured(ModelConfig(item_features=["article_id", "sleeve_length"]))
    with pytest.raises(ValueError, match="'sleeve_length' has no cardinality"):
        table_configs(cfg, CARDS)


def test_mf_is_id_only_without_mlp():
    mf = OmegaConf.structured(ModelConfig(query_features=["customer_id"], item_features=["article_id"],
                                          query_mlp=[], item_mlp=[], time_features=False))
    model = TwoTower(mf, CARDS, device="cpu")
    assert isinstance(model.query_tower, torch.nn.Identity)
    kjt = KeyedJaggedTensor(keys=["customer_id", "article_id"], values=torch.tensor([3, 4, 7, 8]),
                            lengths=torch.tensor([1, 1, 1, 1]))
    q, i = model(kjt, torch.zeros(2, 2))
    w = model.ebc.embedding_bags
    expect_q = torch.nn.functional.normalize(w["t_customer_id"].weight[[3, 4]], dim=-1)
    expect_i = torch.nn.functional.normalize(w[ARTICLE_TABLE].weight[[7, 8]], dim=-1)
    assert torch.allclose(q, expect_q) and torch.allclose(i, expect_i)


def test_two_tower_forward_and_join_rows():
    model = TwoTower(OmegaConf.structured(ModelConfig()), CARDS, device="cpu")
    b = 3
    q_keys, i_keys = model.query_features, model.item_features
    query = KeyedJaggedTensor(keys=q_keys, values=torch.arange(b * 5 + 4) % 4,
                              lengths=torch.tensor([1] * (b * 5) + [2, 0, 2]))
    item = KeyedJaggedTensor(keys=i_keys, values=torch.arange(b * 8 + 5) % 4,
                             lengths=torch.tensor([1] * (b * 8) + [1, 2, 2]))
    extra = KeyedJaggedTensor(keys=i_keys, values=torch.arange(2 * 8 + 2) % 4,
                              lengths=torch.tensor([1] * (2 * 8) + [1, 1]))
    joined = join_rows(query, item, model.feature_keys, extra)
    assert joined.stride() == b + 2
    assert joined["history"].lengths().tolist() == [2, 0, 2, 0, 0]
    assert joined["desc_tokens"].lengths().tolist() == [1, 2, 2, 1, 1]
    q, i = model(joined, torch.zeros(b + 2, 2))
    assert q.shape == i.shape == (b + 2, 64)
    assert torch.allclose(q.norm(dim=1), torch.ones(b + 2))


def test_row_wise_on_cpu_is_a_clear_error():
    cfg = OmegaConf.structured(ShardingConfig(constraints={"t_article": {"sharding_types": ["row_wise"]}}))
    with pytest.raises(ValueError, match="t_article: row_wise sharding needs CUDA"):
        check_constraints(cfg, torch.device("cpu"), ["t_article"])
    ok = check_constraints(cfg, torch.device("cuda"), ["t_article"])
    assert ok["t_article"].sharding_types == ["row_wise"]


def test_constraint_errors():
    with pytest.raises(ValueError, match="names table 't_articel'"):
        check_constraints(SimpleNamespace(constraints={"t_articel": {}}, fused_optimizer="sgd"),
                          torch.device("cpu"), ["t_article"])
    with pytest.raises(ValueError, match="fused_optimizer=adam needs CUDA"):
        check_constraints(SimpleNamespace(constraints={}, fused_optimizer="adam"), torch.device("cpu"), [])
