"""Export embeddings from a trained run: every article, and the evaluation customers.

    python -m trainer.export data=small                       # one process, any training world size
    torchrun --nproc_per_node=2 -m trainer.export data=small  # or spread over ranks

Reads the train run's own resolved config (``train_dir/config.yaml``) so the model matches, loads its
newest complete checkpoint (DCP reshards a checkpoint saved by any number of ranks onto this world),
refuses it if the prepared data changed since training, and publishes into ``<run_dir>/output`` (written
aside and put in place whole, the report last; data/staging.py):

    items.parquet          article_idx, article_id, embedding (fixed-size list of float32)
    users_<period>.parquet customer_idx, customer_id, embedding, for each eval period (val, test), and
                           with the buying-again mixture each customer's ``repeat_level``
    export_report.json     which run, checkpoint, step and fingerprint the embeddings come from, and the
                           learned terms for buying again one of the last articles (``repeat_bonus``,
                           per position; ``temperature``, the units of the mixture; trainer/model/repeats.py)
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext

import hydra
import numpy as np
import pyarrow as pa
import torch
from omegaconf import DictConfig

from data import vocab
from data.io import fs_and_path, join, write_json, write_parquet
from data.runinfo import start_run
from data.staging import output_of, staged
from trainer import config as _train_config  # noqa: F401
from trainer.loop.runs import load_run
from trainer.parallel import distributed as D
from trainer.retrieval.embedder import Embedder

log = logging.getLogger(__name__)


def embedding_array(x: torch.Tensor) -> pa.Array:
    x = x.detach().float().cpu().numpy()
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def export(cfg: DictConfig, run_dir: str) -> dict:
    embedder, run = load_run(str(cfg.train_dir), str(cfg.checkpoint))
    rank = D.rank()
    # every rank computes embeddings (collectives); rank 0 writes and publishes
    with staged(output_of(run_dir), "export_report.json") if rank == 0 else nullcontext() as out:
        written = _export(embedder, run, rank, out)
    if rank == 0:
        log.info("exported run %s step %d (fingerprint %s): %s into %s", run.train_dir, run.step,
                 run.fingerprint_id, {k: v for k, v in written.items() if k.startswith(("items", "users"))},
                 output_of(run_dir))
    return written


def _export(embedder: Embedder, run, rank: int, out: str | None) -> dict:
    items = embedder.items()
    written = {"train_dir": run.train_dir, "checkpoint": run.checkpoint, "step": run.step,
               "fingerprint": run.fingerprint_id, "data_digest": run.data_digest}
    bonus = embedder.repeat_bonus()
    if bonus is not None:  # scoring adds it for the customer's own last articles (trainer/model/repeats.py)
        written["repeat_bonus"] = [float(x) for x in bonus]
        written["temperature"] = float(embedder.temperature)
        written["repeat_mode"] = "mixture" if embedder.repeat_mixture() else "bonus"
    if rank == 0:
        art_vocab = vocab.load(embedder.prepared, "article_id")
        article_ids = np.r_[-1, art_vocab["value"].to_numpy()]  # row 0 is the OOV bucket
        write_parquet(pa.table({"article_idx": pa.array(np.arange(len(article_ids)), pa.int32()),
                                "article_id": pa.array(article_ids, pa.int64()),
                                "embedding": embedding_array(items)}), join(out, "items.parquet"))
        written["items"] = int(items.shape[0])
    for period in ("val", "test"):
        url = join(embedder.prepared, "eval", f"{period}.parquet")
        if not fs_and_path(url)[0].exists(fs_and_path(url)[1]):
            continue
        cust, emb = embedder.eval_queries(period)
        if rank == 0:
            ids = vocab.load(embedder.prepared, "customer_id")["value"].take(pa.array(cust - 1))
            columns = {"customer_idx": pa.array(cust, pa.int32()), "customer_id": ids,
                       "embedding": embedding_array(emb)}
            level = embedder.repeat_level(emb, items)
            if level is not None:
                columns["repeat_level"] = pa.array(level, pa.float32())
            write_parquet(pa.table(columns), join(out, f"users_{period}.parquet"))
            written[f"users_{period}"] = int(len(cust))
    if rank == 0:
        write_json(written, join(out, "export_report.json"))
    return written


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    rank = int(os.environ.get("RANK", 0))
    run_dir = start_run(cfg) if rank == 0 else str(cfg.run_dir)
    try:
        return export(cfg, run_dir)
    finally:
        D.shutdown()


if __name__ == "__main__":
    main()
