"""The two towers over one TorchRec EmbeddingBagCollection.

One collection holds every table, so DistributedModelParallel shards them all with one plan. The
article table serves the candidate (``article_id``) and the query's purchase history, so both towers
learn one article space. All tables pool by mean: a single id is its own embedding and a bag is its
average.

The history is read one of two ways (``model.history_encoder``): ``bag``, the mean of its articles'
embeddings (feature ``history``); or ``transformer``, the ordered history: one single-id feature per
position (``hist_0`` the newest purchase, ``hist_1`` the one before, ...; positions past a customer's
history hold the OOV id and are masked), plus learned position embeddings and a [CLS] token, through a
small transformer encoder (as SASRec-style sequence encoders do). Both stay one EmbeddingBagCollection:
the positions are features of the article table, so the model shards and pipelines as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from trainer.config import HistoryEncoder, RepeatMode
from trainer.model.repeats import RepeatTerm
from trainer.model.sales import SalesTerm

ARTICLE_TABLE = "t_article"
SHARED_WITH_ARTICLE = {"article_id", "history"}
POSITION_PREFIX = "hist_"  # hist_0 .. hist_{P-1}: the history by position, newest first


def table_name(feature: str) -> str:
    shared = feature in SHARED_WITH_ARTICLE or feature.startswith(POSITION_PREFIX)
    return ARTICLE_TABLE if shared else f"t_{feature}"


def position_keys(cfg) -> list[str]:
    return [f"{POSITION_PREFIX}{p}" for p in range(cfg.history_positions)]


def query_keys(cfg) -> list[str]:
    """The query tower's sparse features: with the transformer, the history by position."""
    if str(cfg.history_encoder) == "auto" and "history" in cfg.query_features:
        raise ValueError("model.history_encoder=auto is resolved against the prepared data before the model is "
                         "built (trainer/model/signals.py follow_data)")
    if cfg.history_encoder != HistoryEncoder.transformer or "history" not in cfg.query_features:
        return list(cfg.query_features)
    return [f for f in cfg.query_features if f != "history"] + position_keys(cfg)


def managed_rows(cfg) -> dict[str, int]:
    """model.ids=managed: the fixed rows of the customer and article tables (none: grown by vocabulary)."""
    if str(getattr(cfg, "ids", "grown")) != "managed":
        return {}
    return {"t_customer_id": int(cfg.managed.customer_rows), ARTICLE_TABLE: int(cfg.managed.article_rows)}


def table_configs(cfg, cards: dict) -> list[EmbeddingBagConfig]:
    """One table per feature, except that the article id and the history share the article table; a
    managed table has its fixed size."""
    fixed = managed_rows(cfg)
    tables: dict[str, EmbeddingBagConfig] = {}
    for feat in [*query_keys(cfg), *cfg.item_features]:
        name = table_name(feat)
        card_key = "article_id" if name == ARTICLE_TABLE else feat
        if card_key not in cards:
            raise ValueError(f"model feature {feat!r} has no cardinality in the prepared data "
                             f"(known: {sorted(cards)})")
        if fixed.get(name, 2) < 2:
            key = "customer_rows" if name == "t_customer_id" else "article_rows"
            raise ValueError(f"model.ids=managed needs model.managed.{key}: the table's fixed rows, at least 2 "
                             f"(this data has {int(cards[card_key]):,} {card_key} values)")
        dim = cfg.id_dim if feat == "customer_id" or table_name(feat) == ARTICLE_TABLE else cfg.feature_dim
        if name in tables:
            tables[name].feature_names.append(feat)
        else:
            tables[name] = EmbeddingBagConfig(name=name, embedding_dim=dim,
                                              num_embeddings=fixed.get(name, int(cards[card_key])),
                                              feature_names=[feat], pooling=PoolingType.MEAN)
    return list(tables.values())


def mlp(sizes: list[int], out: int) -> nn.Module:
    layers, prev = [], sizes[0]
    for h in sizes[1:]:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, out))
    return nn.Sequential(*layers)


class SequenceEncoder(nn.Module):
    """The ordered history (n, P, D), newest first, with its lengths, to one vector per query: the output
    at a [CLS] token that attends to the valid positions (an empty history gives the [CLS] alone).

    The parameters are a pre-norm ``nn.TransformerEncoder``'s (its layers' names), and the function is
    that encoder's at the [CLS] token, computed by hand for speed: the last layer computes the [CLS] row
    only (the other rows' outputs are never read; only their keys and values are), which takes about
    two fifths of the encoder's work away, and attention runs through ``scaled_dot_product_attention``
    with a boolean mask (no float mask of (n, heads, T, T)). tests/test_towers.py checks it against
    ``nn.TransformerEncoder`` itself."""

    def __init__(self, dim: int, positions: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(positions + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        n, p, d = seq.shape
        x = torch.cat([self.cls.expand(n, 1, d), seq], dim=1) + self.position[None]
        slot = torch.arange(p + 1, device=seq.device)[None, :]
        valid = slot <= lengths.to(seq.device)[:, None].clamp(max=p)  # slot 0 ([CLS]) is always valid
        mask = valid[:, None, None, :]  # (n, 1, 1, T): True where a key is attended to
        layers = self.encoder.layers
        for i, layer in enumerate(layers):
            x = self._layer(layer, x, mask, cls_only=i == len(layers) - 1)
        return self.norm(x[:, 0])

    def _layer(self, layer: nn.TransformerEncoderLayer, x: torch.Tensor, mask: torch.Tensor,
               cls_only: bool) -> torch.Tensor:
        """One pre-norm encoder layer: x + attention(norm1(x)), then + feed-forward(norm2(.)); with
        ``cls_only`` for the [CLS] row alone (every row still gives its key and value)."""
        n, _, d = x.shape
        attn = layer.self_attn
        h = attn.num_heads
        z = layer.norm1(x)
        w, b = attn.in_proj_weight, attn.in_proj_bias
        if cls_only:
            q = F.linear(z[:, :1], w[:d], b[:d])
            k, v = F.linear(z, w[d:], b[d:]).chunk(2, dim=-1)
            x = x[:, :1]
        else:
            q, k, v = F.linear(z, w, b).chunk(3, dim=-1)
        split = lambda y: y.reshape(n, y.shape[1], h, d // h).transpose(1, 2)  # noqa: E731  (n, h, rows, d/h)
        a = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask,
                                           dropout_p=attn.dropout if self.training else 0.0)
        a = attn.out_proj(a.transpose(1, 2).reshape(n, -1, d))
        x = x + layer.dropout1(a)
        return x + layer._ff_block(layer.norm2(x))


class TwoTower(nn.Module):
    def __init__(self, cfg, cards: dict, device: torch.device | str = "meta"):
        super().__init__()
        self.cfg = cfg
        self.query_features = list(cfg.query_features)
        self.item_features = list(cfg.item_features)
        self.positions = position_keys(cfg) if query_keys(cfg) != self.query_features else []
        self.tables = table_configs(cfg, cards)
        self.ebc = EmbeddingBagCollection(tables=self.tables, device=torch.device(device))
        dims = {f: t.embedding_dim for t in self.tables for f in t.feature_names}
        self.sequence = SequenceEncoder(cfg.id_dim, len(self.positions), cfg.encoder_layers, cfg.encoder_heads,
                                        cfg.dropout) if self.positions else None
        dims["history"] = cfg.id_dim  # the bag, or the encoder's output in its place
        q_in = sum(dims[f] for f in self.query_features) + (2 if cfg.time_features else 0)
        i_in = sum(dims[f] for f in self.item_features)
        if cfg.query_mlp or cfg.item_mlp or q_in != i_in or cfg.time_features:
            self.query_tower = mlp([q_in, *cfg.query_mlp], cfg.output_dim)
            self.item_tower = mlp([i_in, *cfg.item_mlp], cfg.output_dim)
            self.output_dim = cfg.output_dim
        else:  # matrix factorisation: the id embeddings are the vectors
            self.query_tower = nn.Identity()
            self.item_tower = nn.Identity()
            self.output_dim = i_in
        self.feature_keys = [*query_keys(cfg), *self.item_features]
        self.id_rows = False  # see forward
        self.managed = None  # model.ids=managed: the ids' map to rows (trainer/model/managed.py), set by the builder
        # dropout on each tower's input (the concatenated features), training only
        self.input_dropout = nn.Dropout(float(getattr(cfg, "input_dropout", 0.0) or 0.0))
        # The scoring terms beside the inner product, each a typed submodule that the loss and the
        # Retriever call (a new term: one module with loss_term, plus its scoring side, and its test):
        # recent sales (trainer/model/sales.py) and buying again (trainer/model/repeats.py).
        n_age = int(getattr(cfg, "age_buckets", 0) or 0)
        self.sales = SalesTerm(cfg.recent_sales_buckets * max(1, n_age), n_age,
                               float(getattr(cfg, "launch_boost", 0.0) or 0.0)) if cfg.recent_sales_buckets else None
        mixture = cfg.repeat_mode == RepeatMode.mixture
        self.repeats = RepeatTerm(cfg.repeat_positions, self.output_dim, mixture) if cfg.repeat_positions else None

    def scoring_terms(self) -> list[nn.Module]:
        """The terms the loss adds to every candidate's logit, in a fixed order."""
        return [t for t in (self.sales, self.repeats) if t is not None]

    def forward(self, sparse: KeyedJaggedTensor, query_dense: torch.Tensor,
                n_query: int | None = None):
        """Query vectors for the first ``n_query`` rows (all by default) and item vectors for every row
        of ``sparse``; rows without query (or item) features give meaningless vectors on that side,
        which callers slice away. Extra candidate rows come after the queries, so the query tower skips
        them. With ``self.id_rows`` set, training also returns the id embeddings the first ``n_query`` rows
        looked up (customer, article: the loss's L2 on the rows a batch touches; an attribute, not an
        argument, so that TorchRec's FX trace of the pipelined model sees no branch on an input)."""
        n = n_query if n_query is not None else sparse.stride()
        if self.managed is not None:  # ids to the managed tables' rows (recorded in training)
            sparse = self.managed(sparse, n)
        pooled = self.ebc(sparse).to_dict()
        history = None  # the transformer's reading of the history, in the bag's place (no item
        if self.sequence is not None:  # assignment into ``pooled``: TorchRec's FX trace must pass here)
            seq = torch.stack([pooled[k][:n] for k in self.positions], dim=1)
            history = self.sequence(seq, query_dense[:n, 2].long())  # query_dense[:, 2]: history length
        q = torch.cat([history if f == "history" and history is not None else pooled[f][:n]
                       for f in self.query_features]
                      + ([query_dense[:n, :2]] if self.cfg.time_features else []), dim=1)
        i = torch.cat([pooled[f] for f in self.item_features], dim=1)
        q, i = self.query_tower(self.input_dropout(q)), self.item_tower(self.input_dropout(i))
        if self.cfg.normalize:
            q, i = F.normalize(q, dim=-1), F.normalize(i, dim=-1)
        if self.id_rows and self.training:
            return q, i, [pooled[f][:n] for f in ("customer_id", "article_id")
                          if f in self.feature_keys]
        return q, i




def unwrap(model: nn.Module) -> TwoTower:
    """The TwoTower inside DistributedModelParallel / DDP (their ``module``: the sharded model, unwrapped)."""
    while not isinstance(model, TwoTower):
        inner = getattr(model, "module", None)
        if inner is None or inner is model:
            raise TypeError(f"{type(model).__name__} holds no TwoTower")
        model = inner
    return model


# Parameters renamed when the scoring terms became submodules: checkpoints saved before still load
# (trainer/loop/checkpoint.py reads the old names when the new ones are missing).
RENAMED = {"sales.bias": "sales_bias", "repeats.bias": "repeat_bias", "repeats.level.": "repeat_level."}
