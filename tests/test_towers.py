"""Model and sharding on one process: tables, shared article table, MF shape, constraint errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torchrec import KeyedJaggedTensor

from trainer.config import ModelConfig, ShardingConfig
from trainer.model.inputs import join_rows
from trainer.model.towers import ARTICLE_TABLE, TwoTower, table_configs
from trainer.parallel.sharding import check_constraints

CARDS = {"customer_id": 11, "age_bucket": 5, "club_status": 4, "news_freq": 4, "postal_code": 32, "article_id": 21,
         "product_type": 6, "product_group": 4, "colour_group": 7, "department": 9, "index": 5, "section": 6,
         "garment_group": 5, "desc_tokens": 64}


def test_history_shares_the_article_table():
    """The bag history: one feature on the article table (the transformer's positions: test below)."""
    tables = {t.name: t for t in table_configs(OmegaConf.structured(ModelConfig(history_encoder="bag")), CARDS)}
    assert tables[ARTICLE_TABLE].feature_names == ["history", "article_id"]
    assert tables[ARTICLE_TABLE].num_embeddings == 21 and tables["t_customer_id"].embedding_dim == 64
    assert tables["t_section"].embedding_dim == 16


def test_unknown_feature_is_named():
    cfg = OmegaConf.structured(ModelConfig(history_encoder="transformer", item_features=["article_id", "sleeve_length"]))
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
    model = TwoTower(OmegaConf.structured(ModelConfig(history_encoder="bag")), CARDS, device="cpu")
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


def test_history_positions_newest_first_against_a_loop():
    from torchrec import JaggedTensor

    from trainer.model.inputs import history_positions

    hist = [[5, 6, 7], [], [9], [1, 2, 3, 4, 8]]
    jt = JaggedTensor(values=torch.tensor([v for h in hist for v in h]), lengths=torch.tensor([len(h) for h in hist]))
    got = history_positions(jt, 3).view(3, 4).T.tolist()
    want = [[(h[::-1] + [0, 0, 0])[p] for p in range(3)] for h in hist]
    assert got == want
    empty = JaggedTensor(values=torch.zeros(0, dtype=torch.long), lengths=torch.zeros(2, dtype=torch.long))
    assert history_positions(empty, 2).tolist() == [0, 0, 0, 0]


def test_transformer_history_reads_order_and_positions_share_the_article_table():
    from data.batch import Batch
    from trainer.model.inputs import ModelInput

    cfg = OmegaConf.structured(ModelConfig(history_encoder="transformer", history_positions=4))
    torch.manual_seed(0)
    model = TwoTower(cfg, CARDS, device="cpu")
    tables = {t.name: t for t in model.tables}
    assert tables[ARTICLE_TABLE].feature_names == ["hist_0", "hist_1", "hist_2", "hist_3", "article_id"]
    assert "history" not in model.feature_keys and model.sequence is not None
    ebc = model.ebc.embedding_bags
    with torch.no_grad():  # distinct article vectors, so that order can matter
        ebc[ARTICLE_TABLE].weight.copy_(torch.randn_like(ebc[ARTICLE_TABLE].weight))

    def query(histories):
        b = len(histories)
        qkeys = ["customer_id", "age_bucket", "club_status", "news_freq", "postal_code", "history"]
        values = [1] * (b * 5) + [v for h in histories for v in h]
        lengths = [1] * (b * 5) + [len(h) for h in histories]
        q = KeyedJaggedTensor(keys=qkeys, values=torch.tensor(values), lengths=torch.tensor(lengths))
        ikeys = model.item_features
        item = KeyedJaggedTensor(keys=ikeys, values=torch.ones(b * len(ikeys), dtype=torch.long),
                                 lengths=torch.ones(b * len(ikeys), dtype=torch.long))
        batch = Batch(q, item, torch.zeros(b, 2), torch.ones(b, dtype=torch.long), torch.ones(b, dtype=torch.long))
        inp = ModelInput.from_batch(batch, model.feature_keys)
        return model(inp.sparse, inp.query_dense, b)[0]

    model.eval()
    out = query([[3, 4, 5], [5, 4, 3], [], [3, 4, 5, 6, 7, 8]])
    assert torch.isfinite(out).all()  # an empty history is the [CLS] token alone
    assert not torch.allclose(out[0], out[1], atol=1e-4)  # the same articles in another order
    longer = query([[9, 9, 3, 4, 5]])  # beyond 4 positions only the newest 4 count ...
    assert torch.allclose(longer[0], query([[9, 3, 4, 5]])[0], atol=1e-6)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_sequence_encoder_is_the_pre_norm_transformer_at_the_cls_token(layers):
    """The hand-written encoder (last layer for the [CLS] row only, boolean-masked attention) against
    ``nn.TransformerEncoder`` with the same parameters: outputs and every parameter's gradient."""
    from trainer.model.towers import SequenceEncoder

    torch.manual_seed(layers)
    n, p, d = 7, 5, 16
    enc = SequenceEncoder(d, p, layers, heads=2, dropout=0.0).double()  # float64: only the math may differ
    seq = torch.randn(n, p, d, dtype=torch.float64)
    lengths = torch.tensor([0, 1, 2, 5, 9, 3, 4])  # empty, partial, full and longer than the window

    def reference(m: SequenceEncoder) -> torch.Tensor:
        x = torch.cat([m.cls.expand(n, 1, d), seq], dim=1) + m.position[None]
        padding = torch.arange(p + 1)[None, :] > lengths.clamp(max=p)[:, None]
        return m.norm(m.encoder(x, src_key_padding_mask=padding)[:, 0])

    for mode in ("train", "eval"):
        getattr(enc, mode)()
        enc.zero_grad()
        got = enc(seq, lengths)
        got.pow(2).sum().backward()
        got_grads = {k: v.grad.clone() for k, v in enc.named_parameters()}
        enc.zero_grad()
        want = reference(enc)
        want.pow(2).sum().backward()
        assert torch.allclose(got, want, atol=1e-10), (mode, (got - want).abs().max())
        for k, v in enc.named_parameters():
            assert torch.allclose(got_grads[k], v.grad, atol=1e-10), (mode, k, (got_grads[k] - v.grad).abs().max())


@pytest.mark.parametrize("encoder,query_features", [
    ("bag", None), ("transformer", None),
    ("transformer", ["history", "customer_id", "age_bucket"]),  # the history first: no group before it
    ("transformer", ["customer_id", "history", "postal_code"]),  # ... in the middle
])
def test_towers_read_each_feature_where_a_per_feature_concatenation_puts_it(encoder, query_features):
    """The towers' inputs, built by one regroup of the pooled output, against the same inputs built from
    the per-feature dict, concatenated in the configured feature order (the layout checkpoints hold)."""
    extra = {"query_features": query_features} if query_features else {}
    cfg = OmegaConf.structured(ModelConfig(history_encoder=encoder, history_positions=3, **extra))
    torch.manual_seed(0)
    model = TwoTower(cfg, CARDS, device="cpu").eval()
    with torch.no_grad():
        for table in model.ebc.embedding_bags.values():
            table.weight.copy_(torch.randn_like(table.weight))
    keys, b = model.feature_keys, 4
    sparse = KeyedJaggedTensor(keys=keys, values=torch.randint(1, 4, (len(keys) * b,)),
                               lengths=torch.ones(len(keys) * b, dtype=torch.long))
    dense = torch.cat([torch.randn(b, 2), torch.tensor([[3.0], [1.0], [0.0], [2.0]])], dim=1)
    seen = {}
    model.query_tower.register_forward_pre_hook(lambda m, a: seen.__setitem__("q", a[0]))
    model.item_tower.register_forward_pre_hook(lambda m, a: seen.__setitem__("i", a[0]))
    with torch.no_grad():
        model(sparse, dense, b)
        pooled = model.ebc(sparse).to_dict()
        history = (model.sequence(torch.stack([pooled[k] for k in model.positions], dim=1), dense[:, 2])
                   if model.positions else None)
    want_q = torch.cat([history if f == "history" and history is not None else pooled[f]
                        for f in model.query_features] + [dense[:, :2]], dim=1)
    want_i = torch.cat([pooled[f] for f in model.item_features], dim=1)
    assert torch.equal(seen["q"], want_q) and torch.equal(seen["i"], want_i)


def test_id_rows_are_the_table_rows_the_queries_looked_up():
    """model.id_rows (optim.table_l2): training returns the customer and article rows of the first n rows,
    read straight from the tables; eval returns the two towers only; input dropout only trains."""
    cfg = OmegaConf.structured(ModelConfig(history_encoder="bag", input_dropout=0.5))
    model = TwoTower(cfg, CARDS, device="cpu")
    b, keys = 3, model.feature_keys
    cust, art = torch.tensor([4, 0, 9]), torch.tensor([7, 20, 7])
    values = {"customer_id": cust, "article_id": art}
    lengths = torch.cat([torch.ones(b, dtype=torch.long) for _ in keys])
    sparse = KeyedJaggedTensor(keys=keys, values=torch.cat([values.get(k, torch.zeros(b, dtype=torch.long))
                                                            for k in keys]), lengths=lengths)
    model.id_rows = True
    q, i, rows = model(sparse, torch.zeros(b, 3), 2)
    tables = model.ebc.embedding_bags
    assert torch.equal(rows[0], tables["t_customer_id"].weight[cust[:2]])
    assert torch.equal(rows[1], tables["t_article"].weight[art[:2]])
    model.eval()
    out = model(sparse, torch.zeros(b, 3), 2)
    assert len(out) == 2 and torch.equal(model(sparse, torch.zeros(b, 3), 2)[0], out[0])  # no dropout
    model.train()
    assert not torch.equal(model(sparse, torch.zeros(b, 3), 2)[0], out[0])
