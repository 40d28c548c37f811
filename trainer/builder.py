"""One builder for the sharded model and its optimisers, used by training and inference alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from trainer.model import TwoTower
from trainer.sharding import init_tables, shard


@dataclass
class Built:
    model: torch.nn.Module  # DistributedModelParallel(TwoTower)
    dense_optimizer: KeyedOptimizerWrapper | None  # AdamW over the MLPs; None for matrix factorisation
    keys: list[str]  # the model's feature keys, in the order its KJT holds them
    output_dim: int  # of both towers' vectors

    @property
    def fused_optimizer(self):
        """The tables' optimiser, applied inside backward by FBGEMM."""
        return self.model.fused_optimizer


def build(cfg, cards: dict, device: torch.device, print_plan: bool | None = None) -> Built:
    """Plans and shards the model over the process group. The dense init is drawn before sharding and
    the tables' after it from the seed alone: the same model at any world size."""
    torch.manual_seed(cfg.trainer.seed)
    model = TwoTower(cfg.model, cards, device="meta")
    sharding = cfg.sharding
    dmp = shard(model, sharding, device, print_plan=sharding.print_plan if print_plan is None else print_plan)
    init_tables(dmp, model.tables, cfg.trainer.seed)
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    opt = None
    if dense:
        lr, wd = cfg.optim.lr, cfg.optim.weight_decay
        opt = KeyedOptimizerWrapper(dense, lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=wd))
        materialise_adamw(opt)
    return Built(dmp, opt, model.feature_keys, model.output_dim)


def materialise_adamw(opt: KeyedOptimizerWrapper) -> None:
    """Creates AdamW's moments now instead of at the first step, so that a checkpoint can be loaded into
    them. Zero moments at step 0 are exactly what the first step would create, so a fresh run is unchanged."""
    inner = opt._optimizer
    for group in inner.param_groups:
        for p in group["params"]:
            if not inner.state.get(p):
                inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}
