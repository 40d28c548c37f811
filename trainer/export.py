"""Export embeddings from a trained run: every article, and the evaluation customers.

    python -m trainer.export data=small                       # one process, any training world size
    torchrun --nproc_per_node=2 -m trainer.export data=small  # or spread over ranks

Reads the train run's own resolved config (``train_dir/config.yaml``) so the model matches, loads its
newest complete checkpoint (DCP reshards a checkpoint saved by any number of ranks onto this world),
and writes into the run directory:

    items.parquet          article_idx, article_id, embedding (fixed-size list of float32)
    users_<period>.parquet customer_idx, customer_id, embedding, for each eval period (val, test)
"""

from __future__ import annotations

import logging
import os

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from data import vocab
from data.io import fs_and_path, join, write_parquet
from data.runinfo import start_run
from trainer import config as _train_config  # noqa: F401
from trainer.train import Trainer

log = logging.getLogger(__name__)


def embedding_array(x: torch.Tensor) -> pa.Array:
    x = x.detach().float().cpu().numpy()
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


@torch.no_grad()
def user_embeddings(trainer: Trainer, period: str) -> tuple[np.ndarray, torch.Tensor]:
    """Query embeddings of one eval set, ranks computing slices with equal numbers of forward calls."""
    ev = pq.read_table(join(trainer.prepared, "eval", f"{period}.parquet"))
    n, world, rank = ev.num_rows, trainer.world, trainer.rank
    per_rank = -(-n // world)
    chunk = 4096
    outs = []
    for c in range(-(-per_rank // chunk)):
        lo = rank * per_rank + c * chunk
        rows = np.arange(lo, min(lo + chunk, (rank + 1) * per_rank, n))
        sub = ev.take(rows if len(rows) else np.zeros(1, np.int64))
        hist = sub["history"].combine_chunks()
        off = hist.offsets.to_numpy()
        q = trainer.query_embeddings(sub["customer_idx"].to_numpy(), sub["day"].to_numpy(), np.diff(off),
                                     hist.values.to_numpy()[off[0]:off[-1]])
        outs.append(q[:len(rows)])
    local = torch.cat(outs) if outs else torch.zeros(0, 1)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(local)]))
    pad = torch.zeros(per_rank - len(local), local.shape[1], dtype=local.dtype)
    parts = [torch.empty(per_rank, local.shape[1], dtype=local.dtype) for _ in range(world)]
    dist.all_gather(parts, torch.cat([local, pad]))
    full = torch.cat([p[:int(s)] for p, s in zip(parts, sizes)])
    return ev["customer_idx"].to_numpy(), full


def export(cfg: DictConfig, run_dir: str) -> dict:
    train_dir = str(cfg.train_dir)
    cfg_path = join(train_dir, "config.yaml")
    if not fs_and_path(cfg_path)[0].exists(fs_and_path(cfg_path)[1]):
        raise FileNotFoundError(f"{cfg_path}: no train run here; train first or set train_dir")
    train_cfg = OmegaConf.load(fs_and_path(cfg_path)[1])
    train_cfg.checkpoint_dir = join(train_dir, "checkpoints")
    train_cfg.trainer.resume = True
    train_cfg.trainer.progress = False
    train_cfg.sharding.print_plan = False
    trainer = Trainer(train_cfg, run_dir, tensorboard=False)
    if not trainer.maybe_resume(weights_only=True):
        raise FileNotFoundError(f"{train_cfg.checkpoint_dir}: no complete checkpoint to export")
    items = trainer.item_embeddings()
    written = {"step": trainer.step}
    if trainer.rank == 0:
        art_vocab = vocab.load(trainer.prepared, "article_id")
        article_ids = np.r_[-1, art_vocab["value"].to_numpy()]  # row 0 is the OOV bucket
        write_parquet(pa.table({"article_idx": pa.array(np.arange(len(article_ids)), pa.int32()),
                                "article_id": pa.array(article_ids, pa.int64()),
                                "embedding": embedding_array(items)}), join(run_dir, "items.parquet"))
        written["items"] = int(items.shape[0])
    for period in ("val", "test"):
        url = join(trainer.prepared, "eval", f"{period}.parquet")
        if not fs_and_path(url)[0].exists(fs_and_path(url)[1]):
            continue
        cust, emb = user_embeddings(trainer, period)
        if trainer.rank == 0:
            ids = vocab.load(trainer.prepared, "customer_id")["value"].take(pa.array(cust - 1))
            write_parquet(pa.table({"customer_idx": pa.array(cust, pa.int32()), "customer_id": ids,
                                    "embedding": embedding_array(emb)}), join(run_dir, f"users_{period}.parquet"))
            written[f"users_{period}"] = int(len(cust))
    if trainer.rank == 0:
        log.info("exported from step %d: %s into %s", trainer.step, written, run_dir)
    return written


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    rank = int(os.environ.get("RANK", 0))
    run_dir = start_run(cfg) if rank == 0 else str(cfg.run_dir)
    try:
        return export(cfg, run_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
