"""The builder: the sharded model and its optimisers (training and inference alike), and for a training
run everything else it is made of (build_training)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from data.prepared import Prepared
from trainer.model.cold import first_sold
from trainer.model.sales import RecentSales
from trainer.model.towers import TwoTower, managed_rows, unwrap
from trainer.parallel.sharding import init_tables, reset_rows, shard
from trainer.retrieval.embedder import Embedder

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # the training parts import the model's modules: built lazily, for inference's sake
    from data.loader import BatchLoader
    from data.stream import ExampleStream
    from trainer.loop.pipeline import Steps
    from trainer.loop.schedule import LRSchedule
    from trainer.loop.task import TrainTask
    from trainer.model.loss import LogQ
    from trainer.model.negatives import HardNegativeMiner


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


def build(cfg, ds: Prepared, device: torch.device, print_plan: bool | None = None) -> Built:
    """Plans and shards the model for the prepared dataset ``ds`` over the process group, its scoring
    terms given the data they read. The dense init is drawn before sharding and the tables' after it from
    the seed alone: the same model at any world size."""
    torch.manual_seed(cfg.trainer.seed)
    model = TwoTower(cfg.model, ds.cardinalities, device="meta")
    if model.sales is not None:  # the recent-sales table: data of the prepared run, not a parameter
        n_age = int(cfg.model.age_buckets)
        model.sales.attach(RecentSales(ds.url, ds.get("recent_sales"), ds.n_articles,
                                       int(cfg.model.recent_sales_buckets), device,
                                       first_sold(ds.url, ds.n_articles) if n_age else None, n_age,
                                       ds.parent_rows("article_id"), ds.listing_days("article_id")))
    sharding = cfg.sharding
    dmp = shard(model, sharding, device, print_plan=sharding.print_plan if print_plan is None else print_plan)
    init_tables(dmp, model.tables, cfg.trainer.seed)
    if managed_rows(cfg.model):  # built on the device after sharding: the maps stay whole on every rank
        attach_managed(dmp, cfg, device)
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    opt = None
    if dense:
        lr, wd = cfg.optim.lr, cfg.optim.weight_decay
        opt = KeyedOptimizerWrapper(dense, lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=wd))
        materialise_adamw(opt)
    return Built(dmp, opt, model.feature_keys, model.output_dim)


def attach_managed(dmp, cfg, device: torch.device) -> None:
    """model.ids=managed: the MCH maps in front of the sharded customer and article tables; an evicted row
    starts over (trainer/model/managed.py)."""
    from trainer.model.managed import managed_tables

    model = unwrap(dmp)
    configs = {t.name: t for t in model.tables}
    seed = int(cfg.trainer.seed)
    model.managed = managed_tables(cfg.model, {t.name: list(t.feature_names) for t in model.tables},
                                   int(cfg.trainer.global_batch_size), seed, device)
    model.managed.on_evict = lambda table, rows, step: reset_rows(dmp, configs[table], rows, seed, step)


def materialise_adamw(opt: KeyedOptimizerWrapper) -> None:
    """Creates AdamW's moments now instead of at the first step, so that a checkpoint can be loaded into
    them. Zero moments at step 0 are exactly what the first step would create, so a fresh run is unchanged."""
    inner = opt._optimizer
    for group in inner.param_groups:
        for p in group["params"]:
            if not inner.state.get(p):
                inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}


@dataclass
class Training:
    """Everything a training run is made of, built once (trainer/train.py only runs it)."""

    built: Built
    stream: "ExampleStream"
    loader: "BatchLoader"
    embedder: Embedder
    logq: "LogQ"
    miner: "HardNegativeMiner | None"
    task: "TrainTask"
    steps: "Steps"
    schedule: "LRSchedule"
    total_steps: int
    negatives: list  # the negative sources beyond the batch (trainer/model/negatives.py), each a component
    follows_data: list  # what the model's settings resolved to on this data (trainer/model/signals.py)

    @property
    def components(self) -> list:
        """What the loop calls before every step (``before_step(StepAt)``), in this order."""
        return [*self.negatives, self.task]

    def checkpoint_parts(self, state, device: torch.device, rank: int) -> dict:
        """Everything a checkpoint of the run holds, each part Stateful."""
        from trainer.loop.state import ModelState, OptimizerState, PerRank, RngState

        parts = {"model": ModelState(self.built.model), "fused_optimizer": OptimizerState(self.built.fused_optimizer),
                 "train": state, "rng": PerRank(RngState(device), rank)}
        if self.built.dense_optimizer is not None:
            parts["dense_optimizer"] = OptimizerState(self.built.dense_optimizer)
        if self.logq.mode == "streaming":
            parts["logq"] = self.logq
        for source in self.negatives:  # a source with state checkpoints under its name
            if hasattr(source, "state_dict"):
                parts[source.name] = source
        return parts


def build_training(cfg, ds: Prepared, dist) -> Training:
    """The model and optimisers, the stream and its loader, logQ, the miner, the train task, the step
    runner and the learning-rate schedule, for this rank of ``dist``."""
    import numpy as np
    import pyarrow.parquet as pq

    from data.io import join
    from data.loader import make_loader
    from data.stream import ExampleStream
    from trainer.loop.pipeline import Steps, use_pipeline
    from trainer.loop.schedule import LRSchedule
    from trainer.loop.task import TrainTask
    from trainer.model.cold import IdDropout
    from trainer.model.loss import LogQ
    from trainer.model.negatives import HardNegativeMiner, MinedNegatives, UniformNegatives
    from trainer.model.signals import follow_data
    from trainer.parallel.compile import apply as compile_model
    from trainer.parallel.device import loader_workers, set_determinism, set_precision

    loop, lc, dev, prepared = cfg.trainer, cfg.loss, dist.device, cfg.prepare.out
    if loop.global_batch_size <= 0 or loop.global_batch_size % dist.world:
        raise ValueError(f"trainer.global_batch_size={loop.global_batch_size} does not divide over {dist.world} "
                         f"rank(s): choose a multiple of {dist.world}")
    n_items = ds.n_articles
    set_determinism(dev)
    notes = follow_data(cfg.model, ds)  # before anything reads the model's settings (or saves them)
    if dist.rank == 0:
        for line in notes:
            log.info("following the data: %s", line)
    built = build(cfg, ds, dev)
    compiled = compile_model(loop.compile, unwrap(built.model), dev)
    uniform = UniformNegatives(lc.mixed_negatives, n_items, loop.seed, dist.rank, dist.world)
    fresh = int(cfg.model.fresh_days)
    id_dropout = IdDropout(float(cfg.model.id_dropout), loop.seed, first_sold(ds.url, n_items) if fresh else None,
                           fresh) if cfg.model.id_dropout > 0 or fresh else None
    stream = ExampleStream(prepared, loop.global_batch_size, rank=dist.rank, world_size=dist.world, seed=loop.seed,
                           shuffle_rows=loop.shuffle_rows, num_workers=loader_workers(loop.num_workers, dev),
                           extra_rows=uniform if uniform.rows > 0 else None, item_ids=id_dropout)
    embedder = Embedder(built.model, built.keys, ds, dev, stream.tables, lc.temperature,
                        cold_start_sales=int(cfg.model.cold_start_sales))
    counts = torch.from_numpy(np.array(pq.read_table(join(prepared, "item_freq.parquet"))["count"].to_numpy()))
    logq = LogQ(lc.logq, n_items, counts, lc.streaming_alpha, device=dev)
    miner = HardNegativeMiner(lc.hard_negatives, lc.hard_rank_lo, lc.hard_rank_hi, n_items, built.output_dim, dev,
                              lc.hard_anchor) if lc.hard_negatives > 0 else None
    task = TrainTask(built.model, built.keys, lc, logq, miner, stream.tables, n_items, loop.seed, dev,
                     set_precision(loop.precision, dev), mixed=uniform.rows,
                     table_l2=float(cfg.optim.table_l2))
    steps = Steps(built.model, built.dense_optimizer, task, built.keys, dev,
                  use_pipeline(loop.pipeline, miner is not None, dev, dist.world, bool(managed_rows(cfg.model))),
                  compiled)
    negatives = [uniform] if uniform.rows > 0 else []
    if miner is not None:
        negatives.append(MinedNegatives(miner, lc.hard_every, pause=steps.detach,
                                        embed_items=lambda check_stop: embedder.items(check_stop=check_stop,
                                                                                      scoring=False)))
    epochs = sum(stream.batches_per_epoch(e) for e in range(loop.epochs))
    total = epochs if loop.max_steps < 0 else min(loop.max_steps, epochs)
    schedule = LRSchedule(cfg.optim, cfg.sharding.fused_lr, built.dense_optimizer, built.fused_optimizer, total)
    if dist.rank == 0:
        if dist.world > 1:
            for why in not_invariant(cfg, built.model.plan):
                log.warning("%s: this run is not the same training on another number of ranks", why)
        log.info("training on %d rank(s): global batch %d rows (%d per rank), %d steps an epoch; the same "
                 "training on any number of ranks", dist.world, loop.global_batch_size,
                 loop.global_batch_size // dist.world, stream.batches_per_epoch(0))
    return Training(built, stream, make_loader(stream, pin_memory=dev.type == "cuda", packed=True), embedder, logq,
                    miner, task, steps, schedule, total, negatives, notes)


def not_invariant(cfg, plan) -> list[str]:
    """The settings under which N ranks do not train what one rank trains (README, "Scaling out")."""
    out = []
    if cfg.model.dropout > 0 and str(cfg.model.history_encoder) == "transformer":
        out.append(f"model.dropout={cfg.model.dropout} draws its masks on each rank")
    if cfg.model.input_dropout > 0:
        out.append(f"model.input_dropout={cfg.model.input_dropout} draws its masks on each rank")
    if not cfg.loss.cross_rank:
        out.append("loss.cross_rank=false gives each rank's rows only its own rows' positives as candidates")
    column = sorted(name for module in plan.plan.values() for name, p in module.items()
                    if p.sharding_type in ("column_wise", "table_column_wise"))
    if column and str(cfg.sharding.fused_optimizer) == "rowwise_adagrad":
        out.append(f"column-wise sharding of {column} under row-wise Adagrad keeps one accumulator per row of "
                   "each column shard")
    return out
