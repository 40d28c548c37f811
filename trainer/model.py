"""The two towers over one TorchRec EmbeddingBagCollection.

One collection holds every table, so DistributedModelParallel shards them all with one plan. The
article table serves two features: ``article_id`` (the candidate) and ``history`` (the query's bag of
past purchases), so both towers learn one article space. All tables pool by mean: a single id is its
own embedding and a bag is its average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType



ARTICLE_TABLE = "t_article"
SHARED_WITH_ARTICLE = {"article_id", "history"}


def table_name(feature: str) -> str:
    return ARTICLE_TABLE if feature in SHARED_WITH_ARTICLE else f"t_{feature}"


def table_configs(cfg, cards: dict) -> list[EmbeddingBagConfig]:
    """One table per feature, except that article_id and history share the article table."""
    tables: dict[str, EmbeddingBagConfig] = {}
    for feat in [*cfg.query_features, *cfg.item_features]:
        name = table_name(feat)
        card_key = "article_id" if name == ARTICLE_TABLE else feat
        if card_key not in cards:
            raise ValueError(f"model feature {feat!r} has no cardinality in the prepared data "
                             f"(known: {sorted(cards)})")
        dim = cfg.id_dim if feat in ("customer_id", "article_id", "history") else cfg.feature_dim
        if name in tables:
            tables[name].feature_names.append(feat)
        else:
            tables[name] = EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=int(cards[card_key]),
                                              feature_names=[feat], pooling=PoolingType.MEAN)
    return list(tables.values())


def mlp(sizes: list[int], out: int) -> nn.Module:
    layers, prev = [], sizes[0]
    for h in sizes[1:]:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, out))
    return nn.Sequential(*layers)


class TwoTower(nn.Module):
    def __init__(self, cfg, cards: dict, device: torch.device | str = "meta"):
        super().__init__()
        self.cfg = cfg
        self.query_features = list(cfg.query_features)
        self.item_features = list(cfg.item_features)
        self.tables = table_configs(cfg, cards)
        self.ebc = EmbeddingBagCollection(tables=self.tables, device=torch.device(device))
        dims = {f: t.embedding_dim for t in self.tables for f in t.feature_names}
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
        self.feature_keys = [*self.query_features, *self.item_features]

    def forward(self, sparse: KeyedJaggedTensor, query_dense: torch.Tensor,
                n_query: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Query vectors for the first ``n_query`` rows (all by default) and item vectors for every row
        of ``sparse``; rows without query (or item) features give meaningless vectors on that side,
        which callers slice away. Extra candidate rows come after the queries, so the query tower skips
        them."""
        pooled = self.ebc(sparse).to_dict()
        n = n_query if n_query is not None else sparse.stride()
        q = torch.cat([pooled[f][:n] for f in self.query_features]
                      + ([query_dense[:n]] if self.cfg.time_features else []), dim=1)
        i = torch.cat([pooled[f] for f in self.item_features], dim=1)
        q, i = self.query_tower(q), self.item_tower(i)
        if self.cfg.normalize:
            q, i = F.normalize(q, dim=-1), F.normalize(i, dim=-1)
        return q, i


