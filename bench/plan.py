"""Sharding plans on paper: what TorchRec's planner does with the default model on 8 GPUs (one node) and
on 4 nodes x 8 GPUs, at H&M's size and at 10x H&M (13.7M customers, 1M articles), with the memory each
GPU needs for its table shards and their optimiser state (80 GB H100s). No GPU needed.

    .venv/bin/python bench/plan.py [--fused-optimizer rowwise_adagrad|adam]
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from trainer.config import ModelConfig, ShardingConfig  # noqa: E402
from trainer.model.towers import TwoTower  # noqa: E402
from trainer.parallel.sharding import plan_on_paper  # noqa: E402

# Feature cardinalities of the prepared data (+1: the OOV row); the small vocabularies as in hm_scale.
SMALL = {"age_bucket": 13, "club_status": 5, "news_freq": 5, "postal_code": 65_537, "product_type": 132,
         "product_group": 20, "colour_group": 51, "department": 251, "index": 11, "section": 57,
         "garment_group": 22, "desc_tokens": 16_385}
SCALES = {"H&M": {"customer_id": 1_371_981, "article_id": 105_543, **SMALL},
          "10x H&M": {"customer_id": 13_719_801, "article_id": 1_055_421, **SMALL}}
TOPOLOGIES = {"8 GPUs": (8, 8), "4 nodes x 8 GPUs": (32, 8)}


def plans(fused_optimizer: str = "rowwise_adagrad"):
    """(scale, topology, {table: sharding type}, per-rank bytes) for every case."""
    sharding = OmegaConf.structured(ShardingConfig(fused_optimizer=fused_optimizer))
    for scale, cards in SCALES.items():
        model = TwoTower(OmegaConf.structured(ModelConfig(history_encoder="transformer")), cards, device="meta")
        for topo, (world, local) in TOPOLOGIES.items():
            plan, per_rank = plan_on_paper(model, sharding, world, local)
            types = {t: p.sharding_type for params in plan.plan.values() for t, p in params.items()}
            yield scale, topo, types, per_rank, model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fused-optimizer", default="rowwise_adagrad")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    print(f"default model (id dim 64, feature dim 16), fused {args.fused_optimizer}; table weights + optimiser "
          "state per GPU")
    print(f"{'scale':<9} {'topology':<18} {'t_customer_id':<16} {'t_article':<16} {'max GB/GPU':>11} {'min GB/GPU':>11}")
    for scale, topo, types, per_rank, _ in plans(args.fused_optimizer):
        print(f"{scale:<9} {topo:<18} {types['t_customer_id']:<16} {types['t_article']:<16} "
              f"{max(per_rank) / 2**30:>11.2f} {min(per_rank) / 2**30:>11.3f}")


if __name__ == "__main__":
    main()
