"""Sharding plans for many GPUs, made on paper (bench/plan.py): they fit 80 GB GPUs, the big tables are
split (row-wise or table-wise, never replicated), and the shards cover every row exactly once."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
from plan import plans  # noqa: E402

SPLIT = {"row_wise", "table_wise", "table_row_wise", "column_wise", "table_column_wise"}


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_plans_fit_and_split_the_big_tables(optimizer):
    cases = list(plans(optimizer))
    assert {(s, t) for s, t, *_ in cases} == {(s, t) for s in ("H&M", "10x H&M")
                                               for t in ("8 GPUs", "4 nodes x 8 GPUs")}
    for scale, topo, types, per_rank, model in cases:
        assert max(per_rank) < 80 * 2**30, (scale, topo)
        for table in ("t_customer_id", "t_article"):
            assert types[table] in SPLIT, (scale, topo, table, types[table])
        world = 8 if topo == "8 GPUs" else 32
        assert len(per_rank) == world
        # 10x the rows needs about 10x the memory of the id tables: a sanity check of the accounting
    hm = {t: max(r) for s, t, _, r, _ in cases if s == "H&M"}
    big = {t: max(r) for s, t, _, r, _ in cases if s == "10x H&M"}
    assert all(big[t] > 3 * hm[t] for t in hm)


def test_shards_cover_every_row_once():
    from omegaconf import OmegaConf

    from trainer.config import ShardingConfig
    from trainer.parallel.sharding import plan_on_paper

    _, _, _, _, model = next(iter(plans()))
    plan, _ = plan_on_paper(model, OmegaConf.structured(ShardingConfig()), 32, 8)
    rows = {t.name: t.num_embeddings for t in model.tables}
    for params in plan.plan.values():
        for name, p in params.items():
            if p.sharding_spec is None:
                continue
            covered = sorted((s.shard_offsets[0], s.shard_offsets[0] + s.shard_sizes[0]) for s in p.sharding_spec.shards
                             if s.shard_offsets[1] == 0)
            assert covered[0][0] == 0 and covered[-1][1] == rows[name]
            assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), name


def test_topology_built_through_the_factory_without_its_warning(caplog):
    """TorchRec 1.9 logs 'the job will fail' for a Topology made directly; ours goes through the factory
    and keeps what the planner needs: world, node size, device and HBM cap."""
    import logging

    from trainer.parallel.sharding import topology

    with caplog.at_level(logging.WARNING):
        topo = topology(16, "cuda", 8, 80 * 2**30)
        cpu = topology(2, "cpu")
    assert not [r for r in caplog.records if "TopologyFactory" in r.getMessage()]
    assert (topo.world_size, topo.local_world_size, topo.compute_device) == (16, 8, "cuda")
    assert {d.storage.hbm for d in topo.devices} == {80 * 2**30}
    assert (cpu.world_size, cpu.compute_device, len(cpu.devices)) == (2, "cpu", 2)
