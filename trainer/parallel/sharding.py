"""TorchRec sharding: planner, constraints from config, fused table optimiser, DMP wrapper."""

from __future__ import annotations

import logging
import zlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

log = logging.getLogger(__name__)

# Sharding types FBGEMM's CPU kernels support for EmbeddingBagCollection; the rest need CUDA.
CPU_SHARDING = {"data_parallel", "table_wise", "column_wise", "table_column_wise"}
ALL_SHARDING = CPU_SHARDING | {"row_wise", "table_row_wise", "grid_shard"}
FUSED = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD,
         "adam": torch.optim.Adam}
CPU_FUSED = {"rowwise_adagrad", "adagrad", "sgd"}


def check_constraints(cfg, device: torch.device, table_names: list[str]) -> dict[str, ParameterConstraints]:
    """ParameterConstraints from config; what cannot run on this device is a clear error now."""
    out = {}
    for table, c in (cfg.constraints or {}).items():
        if table not in table_names:
            raise ValueError(f"sharding.constraints names table {table!r}; the model's tables are {table_names}")
        types = list(c.get("sharding_types", []) or [])
        for t in types:
            if t not in ALL_SHARDING:
                raise ValueError(f"sharding.constraints.{table}: unknown sharding type {t!r}; "
                                 f"expected one of {sorted(ALL_SHARDING)}")
            if device.type == "cpu" and t not in CPU_SHARDING:
                raise ValueError(f"sharding.constraints.{table}: {t} sharding needs CUDA; on CPU use one of "
                                 f"{sorted(CPU_SHARDING)}")
        kernels = list(c.get("compute_kernels", []) or [])
        out[table] = ParameterConstraints(sharding_types=types or None, compute_kernels=kernels or None)
    if cfg.fused_optimizer not in FUSED:
        raise ValueError(f"sharding.fused_optimizer={cfg.fused_optimizer!r}: expected one of {sorted(FUSED)}")
    if device.type == "cpu" and cfg.fused_optimizer not in CPU_FUSED:
        raise ValueError(f"sharding.fused_optimizer={cfg.fused_optimizer} needs CUDA; FBGEMM's CPU kernels "
                         f"support {sorted(CPU_FUSED)}")
    return out


def topology(world_size: int, device_type: str, local_world_size: int | None = None,
             hbm_bytes: int | None = None) -> Topology:
    """The planner's view of the machines, built through TopologyFactory as TorchRec 1.9 asks (a Topology
    made directly logs, on every rank, that the job will fail)."""
    return TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=local_world_size, hbm_cap_bytes=hbm_bytes),
        kernel_config=KernelConfig(compute_device=device_type))


def shard(model: nn.Module, cfg, device: torch.device, pg=None, print_plan: bool = True) -> DistributedModelParallel:
    """Plans and shards ``model`` (built on the meta device) over the process group."""
    table_names = [t.name for t in model.tables]
    constraints = check_constraints(cfg, device, table_names)
    apply_optimizer_in_backward(FUSED[str(cfg.fused_optimizer)], model.ebc.parameters(), {"lr": cfg.fused_lr})
    world = dist.get_world_size() if dist.is_initialized() else 1
    planner = EmbeddingShardingPlanner(topology=topology(world, device.type), constraints=constraints)
    sharders = [EmbeddingBagCollectionSharder()]
    pg = pg or (dist.group.WORLD if dist.is_initialized() else None)
    plan = planner.collective_plan(model, sharders, pg) if pg is not None else planner.plan(model, sharders)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    if print_plan and (not dist.is_initialized() or dist.get_rank() == 0):
        log.info("%s", plan_table(plan, model.tables, world))
    return dmp


INIT_ROWS = 1 << 16  # table rows drawn from one generator


@torch.no_grad()
def init_tables(dmp: nn.Module, tables, seed: int) -> None:
    """Every table's initial weights, uniform in TorchRec's default range, drawn from (seed, table, block
    of rows) and written into this rank's shards of it: the same tables at any world size and any
    sharding (TorchRec draws each shard from the owning rank's generator, so the start would depend on
    the plan)."""
    by_name = {t.name: t for t in tables}
    for key, value in dmp.state_dict().items():
        parts = key.split(".")
        if parts[-1] != "weight" or len(parts) < 2 or parts[-2] not in by_name:
            continue
        config = by_name[parts[-2]]
        if isinstance(value, ShardedTensor):
            shards = [(s.tensor, s.metadata.shard_offsets, s.metadata.shard_sizes) for s in value.local_shards()]
        else:  # replicated (data parallel)
            shards = [(value, [0, 0], list(value.shape))]
        for tensor, (r0, c0), (nr, nc) in shards:
            if nr and nc:
                rows = table_rows(config, seed, r0, r0 + nr)[:, c0:c0 + nc]
                tensor.copy_(rows.to(device=tensor.device, dtype=tensor.dtype))


def table_rows(config, seed: int, lo: int, hi: int) -> torch.Tensor:
    """Rows ``[lo, hi)`` of a table's initial weights (see :func:`init_tables`)."""
    bound, dim, n = config.get_weight_init_max(), config.embedding_dim, config.num_embeddings
    name = zlib.crc32(config.name.encode())
    blocks = []
    for b in range(lo // INIT_ROWS, (hi - 1) // INIT_ROWS + 1):
        g = torch.Generator().manual_seed(hash((seed, name, b)) & 0x7FFFFFFFFFFF)
        rows = min(INIT_ROWS, n - b * INIT_ROWS)
        blocks.append(torch.rand(rows, dim, generator=g) * (2 * bound) - bound)
    block = torch.cat(blocks)
    start = (lo // INIT_ROWS) * INIT_ROWS
    return block[lo - start:hi - start]


@torch.no_grad()
def reset_rows(dmp: nn.Module, config, rows: torch.Tensor, seed: int, step: int) -> None:
    """Rows ``rows`` (sorted) of table ``config`` start over, as TorchRec's sharded MC-EBC resets evicted rows:
    weights drawn afresh in the table's init range (from the seed, the table and ``step``: the same on
    every rank and world size) and their fused optimiser state zeroed, in this rank's shards."""
    bound, name = config.get_weight_init_max(), config.name
    g = torch.Generator().manual_seed(hash((seed, zlib.crc32(name.encode()), int(step))) & 0x7FFFFFFFFFFF)
    fresh = torch.rand(rows.numel(), config.embedding_dim, generator=g) * (2 * bound) - bound
    rows = rows.cpu().long()
    targets = [(v, True) for k, v in dmp.state_dict().items() if k.endswith(f".{name}.weight")]
    for state in dmp.fused_optimizer.state_dict()["state"].values():
        targets += [(v, False) for k, v in state.items() if k.startswith(f"{name}.")]
    for value, weights in targets:
        shards = ([(s.tensor, s.metadata.shard_offsets) for s in value.local_shards()]
                  if isinstance(value, ShardedTensor) else [(value, [0] * value.dim())])
        for tensor, offsets in shards:
            if not tensor.numel():
                continue
            r0 = offsets[0]
            mine = (rows >= r0) & (rows < r0 + tensor.shape[0])
            local = (rows[mine] - r0).to(tensor.device)
            if weights:
                c0 = offsets[1]
                tensor[local] = fresh[mine][:, c0:c0 + tensor.shape[1]].to(device=tensor.device, dtype=tensor.dtype)
            else:
                tensor[local] = 0


def plan_table(plan, tables, world: int) -> str:
    """The sharding plan in a few lines: one per sharded table (rows, dim, how, kernel, ranks, size);
    the small replicated (data-parallel) tables on one line. TorchRec's own report is in the log file."""
    by_name = {t.name: t for t in tables}
    lines, replicated = [f"sharding plan over {world} rank(s):",
                         f"  {'table':<22} {'rows':>11} {'dim':>4}  {'sharding':<16} {'kernel':<8} {'ranks':<10} MB"], []
    for module in plan.plan.values():
        for param, ps in module.items():
            name = param.split(".")[-1]
            t = by_name.get(name)
            if ps.sharding_type == "data_parallel":
                replicated.append(name)
                continue
            rows, dim = (t.num_embeddings, t.embedding_dim) if t else (0, 0)
            ranks = ",".join(map(str, sorted(set(ps.ranks or []))))
            lines.append(f"  {name:<22} {rows:>11,} {dim:>4}  {ps.sharding_type:<16} {ps.compute_kernel:<8} "
                         f"{ranks[:10]:<10} {rows * dim * 4 / 2**20:.1f}")
    if replicated:
        lines.append(f"  replicated on every rank (data_parallel): {', '.join(sorted(replicated))}")
    return "\n".join(lines)





# Optimiser state per table row, in floats: (per row, per element).
_OPTIMIZER_STATE = {"rowwise_adagrad": (1, 0), "adagrad": (0, 1), "sgd": (0, 0), "adam": (0, 2)}


def plan_on_paper(model: nn.Module, sharding_cfg, world_size: int, local_world_size: int, hbm_gb: float = 80.0):
    """The plan TorchRec's planner makes for ``world_size`` GPUs (``local_world_size`` per node), computed
    without them (the model on the meta device). Returns the plan and each rank's bytes of table weights
    plus table optimiser state."""
    constraints = check_constraints(sharding_cfg, torch.device("cuda"), [t.name for t in model.tables])
    hardware = topology(world_size, "cuda", local_world_size, int(hbm_gb * 2**30))
    plan = EmbeddingShardingPlanner(topology=hardware, constraints=constraints).plan(
        model, [EmbeddingBagCollectionSharder()])
    per_row, per_elem = _OPTIMIZER_STATE[str(sharding_cfg.fused_optimizer)]
    tables = {t.name: t for t in model.tables}
    per_rank = [0] * world_size
    for params in plan.plan.values():
        for name, p in params.items():
            rows, dim = tables[name].num_embeddings, tables[name].embedding_dim
            if p.sharding_spec is None:  # data parallel: a copy on every rank (dense optimiser, not fused)
                for r in range(world_size):
                    per_rank[r] += rows * dim * 4
                continue
            for shard in p.sharding_spec.shards:
                r_rows, r_dim = shard.shard_sizes
                per_rank[shard.placement.rank()] += 4 * (r_rows * r_dim * (1 + per_elem) + r_rows * per_row)
    return plan, per_rank
