"""Train the two-tower model with TorchRec under torchrun.

    torchrun --nproc_per_node=2 -m trainer.train data=tiny                 # 2 CPU processes (gloo)
    torchrun --nproc_per_node=8 -m trainer.train data=hm_scale trainer.batch_size=8192
    python -m trainer.train data=tiny model=mf                              # one process, MF baseline

Reads ``prepare.out`` (run data.prepare first). Writes into the run directory: the resolved config,
``checkpoints/step-N`` (resumed automatically), TensorBoard scalars under ``tb/`` and ``metrics.json``.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from collections import deque

import hydra
import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from data import config as _data_config  # noqa: F401  (registers the data configs)
from data.io import join, read_json, write_json
from data.runinfo import start_run
from data.stream import ExampleStream, FeatureTables, batch_from_arrays, make_loader
from trainer import checkpoint
from trainer import config as _train_config  # noqa: F401  (registers the train configs)
from trainer.loss import LogQ, Negatives, retrieval_loss
from trainer.model import TwoTower, join_rows
from trainer.negatives import HardNegativeMiner
from trainer.sharding import dense_parameters, shard

log = logging.getLogger(__name__)


class _QuietFbgemm(logging.Filter):
    """FBGEMM logs a dozen lines per table-batched kernel (its full argument dict among them) on the
    root logger at INFO; they drown the training log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and str(record.msg).startswith("[TBE="))



def init_distributed(cfg) -> tuple[torch.device, int, int]:
    """nccl with CUDA, gloo otherwise; a one-process group when not started by torchrun."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:  # torchrun
            dist.init_process_group(backend)
        else:  # one process (a plain run, a submitit sweep job): no port to collide on
            store = tempfile.NamedTemporaryFile(prefix="twotower-pg-", delete=False).name
            os.remove(store)
            dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    return device, dist.get_rank(), dist.get_world_size()


class _QuietPipeline(logging.Filter):
    """TrainPipelineSparseDist logs at INFO on every epoch end; keep only what it pipelined, and warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "pipelined" in str(record.msg)


class _NoDenseOptimizer:
    """What the pipeline steps when the model has no dense parameters (matrix factorisation)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


class Trainer:
    """Owns the training state: sharded model, optimisers, data position, step, loss/miner state."""

    def __init__(self, cfg: DictConfig, run_dir: str, tensorboard: bool = True):
        self.cfg, self.run_dir = cfg, run_dir
        logging.getLogger().addFilter(_QuietFbgemm())  # here: Hydra has configured logging by now
        for name in ("train_pipelines", "utils"):
            logging.getLogger(f"torchrec.distributed.train_pipeline.{name}").addFilter(_QuietPipeline())
        loop = cfg.trainer
        self.device, self.rank, self.world = init_distributed(loop)
        self.prepared = cfg.prepare.out
        self.manifest = read_json(join(self.prepared, "manifest.json"))
        self.cards = self.manifest["cardinalities"]
        self.n_items = int(self.cards["article_id"])
        self.tables = FeatureTables(self.prepared, self.manifest)

        torch.manual_seed(loop.seed)  # identical dense init on every rank; tables init per shard
        model = TwoTower(cfg.model, self.cards, device="meta")
        self.model = shard(model, cfg.sharding, self.device)
        dense = list(dense_parameters(self.model))  # none for matrix factorisation
        self.dense_opt = torch.optim.AdamW(dense, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay) \
            if dense else None
        self.keys = model.feature_keys

        # The stream draws the mixed negatives and joins the model's KJT, so that a batch's embedding
        # input is one attribute (batch.sparse) that TrainPipelineSparseDist can prefetch.
        self.stream = ExampleStream(self.prepared, loop.batch_size, rank=self.rank, world_size=self.world,
                                    seed=loop.seed, shuffle_rows=loop.shuffle_rows, num_workers=loop.num_workers,
                                    extra_items=cfg.loss.mixed_negatives)
        self.loader = make_loader(self.stream, pin_memory=self.device.type == "cuda", keys=self.keys)
        counts = torch.from_numpy(pq.read_table(join(self.prepared, "item_freq.parquet"))["count"].to_numpy().copy())
        self.logq = LogQ(cfg.loss.logq, self.n_items, counts, cfg.loss.streaming_alpha)
        lc = cfg.loss
        self.miner = HardNegativeMiner(lc.hard_negatives, lc.hard_rank_lo, lc.hard_rank_hi) \
            if lc.hard_negatives > 0 else None
        self.pipeline = self._make_pipeline() if self._use_pipeline() else None
        self._trained_state: dict | None = None  # loader state after the last trained batch (pipelined)
        self._with_stats = True
        self.step, self.epoch = 0, 0
        self.ckpt_dir = cfg.checkpoint_dir or os.path.join(run_dir, "checkpoints")
        self.metrics: dict = {"val": [], "train": []}
        self._stream_state: dict | None = None
        # Preemption (Slurm sends SIGTERM; `--signal=USR1@T` warns before the time limit): finish the
        # step, checkpoint on every rank, leave a PREEMPTED marker and stop; a restart resumes.
        self._stop_signal = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        self.tb = None
        if self.rank == 0 and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"))

    # ------------------------------------------------------------ state

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def stop_requested(self) -> bool:
        """Whether any rank got a stop signal (all ranks agree, so all checkpoint together)."""
        flag = torch.tensor([self._stop_signal], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def marker(self) -> str:
        return os.path.join(self.run_dir, "PREEMPTED")

    def dense_state(self) -> dict:
        return {"dense_opt": self.dense_opt.state_dict() if self.dense_opt else {}, "logq": self.logq.state_dict(),
                "miner": self.miner.embeddings if self.miner is not None and self.miner.ready else None,
                "metrics": {"val": self.metrics["val"]}}

    def save(self) -> None:
        # The pipeline has pulled batches ahead; the position saved is the one after the last trained batch.
        stream = self._trained_state if self._trained_state is not None else self.loader.state_dict()
        loop_state = {"step": self.step, "epoch": self.epoch, "stream": stream}
        path = checkpoint.save(self.ckpt_dir, self.step, self.model, self.model.fused_optimizer,
                               self.dense_state(), loop_state, self.cfg.trainer.keep_checkpoints)
        if self.rank == 0:
            log.info("checkpoint %s", path)

    def maybe_resume(self, weights_only: bool = False) -> bool:
        """Continues from the newest complete checkpoint; ``weights_only`` (export, recommend) skips the
        optimiser state, which a different world size may have sharded differently."""
        if not self.cfg.trainer.resume:
            return False
        found = checkpoint.load_latest(self.ckpt_dir, self.model, self.model.fused_optimizer,
                                       with_optimizer=not weights_only, world_size=self.world)
        if found is None:
            return False
        dense, loop_state, path, saved_world = found
        resized = saved_world != self.world
        if weights_only:
            self.step, self.epoch = loop_state["step"], loop_state["epoch"]
            return True
        if resized:  # the tables are planned anew: their optimiser state and the data position restart
            if self.rank == 0:
                log.warning("world size changed from %d to %d: resuming weights, dense optimiser and step "
                            "from %s; the table optimiser state restarts and epoch %d starts over",
                            saved_world, self.world, path, loop_state["epoch"])
            if self.dense_opt is not None:
                self.dense_opt.load_state_dict(dense["dense_opt"])
            self.logq.load_state_dict(dense["logq"])
            self.step, self.epoch = loop_state["step"], loop_state["epoch"]
            self._stream_state = None  # so fit() starts the epoch from its beginning
            return True
        if self.dense_opt is not None:
            self.dense_opt.load_state_dict(dense["dense_opt"])
        self.logq.load_state_dict(dense["logq"])
        if self.miner is not None and dense.get("miner") is not None:
            self.miner.refresh(dense["miner"])
        self.metrics["val"] = list(dense.get("metrics", {}).get("val", []))
        self.step, self.epoch = loop_state["step"], loop_state["epoch"]
        self._stream_state = loop_state["stream"]
        if self.rank == 0:
            log.info("resumed from %s (step %d, epoch %d)", path, self.step, self.epoch)
        return True

    # ------------------------------------------------------------ embeddings

    @torch.no_grad()
    def item_embeddings(self, chunk: int = 4096) -> torch.Tensor:
        """(catalogue, D) for every article_idx, each rank computing a slice, then all-gathered.
        Every rank runs the same number of forward calls (the sharded tables need all of them)."""
        n = self.n_items
        per_rank = -(-n // self.world)
        ids = np.arange(self.rank * per_rank, (self.rank + 1) * per_rank) % n
        out = []
        for lo in range(0, per_rank, chunk):
            part = ids[lo:lo + chunk]
            batch = batch_from_arrays(self.tables, np.zeros(len(part)), part, np.full(len(part), self._day()))
            _, i = self.forward(batch)
            out.append(i)
        local = torch.cat(out)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)[:n]

    @torch.no_grad()
    def query_embeddings(self, customer, day, hist_lengths, hist_values) -> torch.Tensor:
        batch = batch_from_arrays(self.tables, customer, np.zeros(len(customer)), day, hist_lengths, hist_values)
        q, _ = self.forward(batch)
        return q

    def _day(self) -> int:
        return int(np.datetime64(self.manifest["split"]["last_day"], "D").astype(np.int64))

    def forward(self, batch):
        """Query and item vectors of a batch built outside the loader (catalogue, customers, mined items)."""
        batch = batch.to(self.device, non_blocking=True)
        return self.model(join_rows(batch.query, batch.item, self.keys), batch.query_dense, len(batch))

    # ------------------------------------------------------------ training

    def _use_pipeline(self) -> bool:
        mode = self.cfg.trainer.pipeline
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"trainer.pipeline={mode!r}: expected auto, on or off")
        if self.cfg.loss.hard_negatives > 0:  # mined negatives need a second, unpipelined table lookup
            if mode == "on":
                raise ValueError("trainer.pipeline=on cannot run with loss.hard_negatives > 0 (the mined "
                                 "negatives need a second embedding lookup per step); use pipeline=auto or off")
            return False
        # auto: wherever there is an input-dist to overlap (measured 1.15x with 2 CPU ranks, bench/train
        # shows nothing to gain in one process)
        return mode == "on" or (mode == "auto" and (self.device.type == "cuda" or self.world > 1))

    def _make_pipeline(self):
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        return TrainPipelineSparseDist(self.model, self.dense_opt or _NoDenseOptimizer(), self.device,
                                       execute_all_batches=True, custom_model_fwd=self._pipelined_forward)

    def _pipelined_forward(self, batch):
        loss, stats, pos_ids = self.forward_loss(batch, self._with_stats)
        return loss, (loss.detach(), stats, pos_ids)

    def forward_loss(self, batch, with_stats: bool = True):
        """The step's loss from a loader batch (with ``sparse`` joined and the mixed negatives drawn)."""
        lc, loop = self.cfg.loss, self.cfg.trainer
        b = len(batch)
        if batch.sparse is None:
            raise ValueError("training batches come from the trainer's loader (batch.sparse joined)")
        dev = batch.to(self.device, non_blocking=True)
        q_all, i_all = self.model(dev.sparse, dev.query_dense, b)  # extra rows: item tower only
        q, pos = q_all[:b], i_all[:b]
        neg = Negatives()
        if lc.mixed_negatives > 0:
            neg.extra, neg.extra_ids = i_all[b:], dev.extra_ids
        if self.miner is not None and self.miner.ready:
            hist = batch.query["history"]
            hist_split = torch.split(hist.values(), hist.lengths().tolist())
            hard_ids = self.miner.mine(q, batch.article_idx, list(hist_split), loop.seed, self.step, self.rank)
            flat = hard_ids.reshape(-1).numpy()
            hard_batch = batch_from_arrays(self.tables, np.zeros(len(flat)), flat, np.full(len(flat), self._day()))
            _, h = self.forward(hard_batch)
            neg.hard, neg.hard_ids = h.view(b, -1, h.shape[-1]), hard_ids.to(self.device)
        pos_ids = dev.article_idx
        loss, stats = retrieval_loss(q, pos, pos_ids, lc, neg, self.logq, dist.group.WORLD, self.n_items,
                                     with_stats=with_stats)
        return loss, stats, pos_ids

    def train_step(self, batch, with_stats: bool = True) -> tuple[float, dict]:
        """One unpipelined step."""
        loss, stats, pos_ids = self.forward_loss(batch, with_stats)
        if self.dense_opt is not None:
            self.dense_opt.zero_grad(set_to_none=True)
        loss.backward()  # the fused table optimiser steps inside backward
        if self.dense_opt is not None:
            self.dense_opt.step()
        self._after_step(pos_ids)
        return float(loss.detach()), stats

    def _after_step(self, pos_ids: torch.Tensor) -> None:
        if self.logq.mode == "streaming":
            gathered = [torch.empty_like(pos_ids) for _ in range(self.world)]
            dist.all_gather(gathered, pos_ids)
            self.logq.update(torch.cat(gathered), self.step + 1)

    def _steps(self):
        """Trains on this epoch's batches; yields (examples, loss, stats) after each step."""
        loop = self.cfg.trainer
        if self.pipeline is None:
            for batch in self.loader:
                if self.cfg.loss.hard_every > 0:
                    self.maybe_refresh_miner(epoch_start=False)
                loss, stats = self.train_step(batch, with_stats=self._logging_step())
                yield len(batch), loss, stats
            return
        states: deque = deque()

        def tracked():
            for batch in self.loader:
                states.append(self.loader.state_dict())
                yield batch

        batches = tracked()
        while True:
            self._with_stats = self._logging_step()
            try:
                loss, stats, pos_ids = self.pipeline.progress(batches)
            except StopIteration:
                return
            self._after_step(pos_ids)
            self._trained_state = states.popleft()
            yield len(pos_ids), float(loss), stats

    def _logging_step(self) -> bool:
        return (self.step + 1) % self.cfg.trainer.log_every == 0 or self.step == 0

    def _detach_pipeline(self) -> None:
        """Gives the tables their own forward back (for validation and export; training re-attaches)."""
        if self.pipeline is not None:
            self.pipeline.detach()

    def maybe_refresh_miner(self, epoch_start: bool) -> None:
        """Re-mines from current item embeddings: every ``hard_every`` steps, or at each epoch start."""
        if self.miner is None:
            return
        every = self.cfg.loss.hard_every
        if (every > 0 and self.step % every == 0) or (every == 0 and epoch_start):
            self.miner.refresh(self.item_embeddings())

    @torch.no_grad()
    def validate(self) -> dict:
        """Recall@K on the validation set by exact search over the whole catalogue."""
        ev = pq.read_table(join(self.prepared, "eval", "val.parquet"))
        n = ev.num_rows
        per_rank = -(-n // self.world)
        rows = np.arange(self.rank * per_rank, min((self.rank + 1) * per_rank, n))
        items = self.item_embeddings()
        ks = sorted(int(k) for k in self.cfg.trainer.recall_k)
        hits = torch.zeros(len(ks), dtype=torch.float64)
        chunk = 2048
        n_calls = -(-per_rank // chunk)
        for c in range(n_calls):  # the same number of forward calls on every rank
            part = rows[c * chunk:(c + 1) * chunk]
            real = len(part)
            sub = ev.take(part if real else np.zeros(1, dtype=np.int64))  # a dummy row keeps step
            hist = sub["history"].combine_chunks()
            off = hist.offsets.to_numpy()
            q = self.query_embeddings(sub["customer_idx"].to_numpy(), sub["day"].to_numpy(), np.diff(off),
                                      hist.values.to_numpy()[off[0]:off[-1]])
            if real == 0:
                continue
            scores = q @ items.T
            scores[:, 0] = -torch.inf
            top = scores.topk(max(ks), dim=1).indices.cpu()
            for r, targets in enumerate(sub["targets"].to_pylist()[:real]):
                t = torch.tensor(targets)
                for j, k in enumerate(ks):
                    hits[j] += torch.isin(top[r, :k], t).sum().item() / len(t)
        counts = torch.tensor([float(len(rows))], dtype=torch.float64)
        dist.all_reduce(hits)
        dist.all_reduce(counts)
        return {f"recall@{k}": float(hits[j] / counts[0]) for j, k in enumerate(ks)}

    def fit(self) -> dict:
        loop = self.cfg.trainer
        self.maybe_resume()
        per_epoch = len(self.loader)
        total = per_epoch * loop.epochs if loop.max_steps < 0 else min(loop.max_steps, per_epoch * loop.epochs)
        bar = tqdm(total=total, initial=self.step, desc="train", disable=not (loop.progress and self.rank == 0),
                   mininterval=1.0)
        t_last, n_last, done = time.perf_counter(), 0, 0 < loop.max_steps <= self.step
        while self.epoch < loop.epochs and not done:
            if self._stream_state is not None and self.step % per_epoch != 0:
                self.loader.load_state_dict(self._stream_state)  # resume mid-epoch, exactly
            else:
                self.stream.set_epoch(self.epoch)
                self.maybe_refresh_miner(epoch_start=True)
            self._stream_state = None
            for n_examples, loss, stats in self._steps():
                logging_step = self._logging_step()
                self.step += 1
                n_last += n_examples
                bar.update(1)
                if logging_step:
                    self._log(loss, stats, n_last / max(time.perf_counter() - t_last, 1e-9))
                    t_last, n_last = time.perf_counter(), 0
                if 0 < loop.max_steps <= self.step:
                    done = True
                    break
                if loop.checkpoint_every > 0 and self.step % loop.checkpoint_every == 0 and self.step % per_epoch:
                    self.save()  # (epoch ends are saved below, after validation)
                if self.stop_requested():
                    return self._preempted(bar)
            if done:
                break
            self.epoch += 1
            self._detach_pipeline()
            if loop.validate:
                val = {"epoch": self.epoch, "step": self.step, **self.validate()}
                self.metrics["val"].append(val)
                if self.rank == 0:
                    log.info("validation after epoch %d: %s", self.epoch,
                             " ".join(f"{k}={v:.4f}" for k, v in val.items() if k.startswith("recall")))
                    for k, v in val.items():
                        if k.startswith("recall"):
                            self.tb.add_scalar(f"val/{k}", v, self.step)
            if self.epoch < loop.epochs:
                self.save()
        bar.close()
        self._detach_pipeline()
        self.save()
        if self.rank == 0:
            write_json({"step": self.step, "epoch": self.epoch, **self.metrics}, join(self.run_dir, "metrics.json"))
            if os.path.exists(self.marker()):
                os.remove(self.marker())
            if self.tb is not None:
                self.tb.close()
        return self.metrics

    def _preempted(self, bar) -> dict:
        bar.close()
        self._detach_pipeline()
        self.save()
        if self.rank == 0:
            with open(self.marker(), "w") as f:
                f.write(f"{self.step}\n")
            log.warning("stop signal %d: checkpointed at step %d and stopped; run again to resume",
                        self._stop_signal, self.step)
        self.metrics["preempted_at"] = self.step
        return self.metrics

    def _log(self, loss: float, stats: dict, per_rank_rate: float) -> None:
        total_rate = per_rank_rate * self.world
        lr = self.dense_opt.param_groups[0]["lr"] if self.dense_opt else self.cfg.sharding.fused_lr
        self.metrics["train"].append({"step": self.step, "loss": loss})
        if self.rank == 0:
            log.info("step %d epoch %d loss %.4f in-batch acc %.3f | %.0f ex/s total, %.0f ex/s per rank | lr %.2e",
                     self.step, self.epoch, loss, stats["in_batch_acc"], total_rate, per_rank_rate, lr)
            self.tb.add_scalar("train/loss", loss, self.step)
            self.tb.add_scalar("train/examples_per_s", total_rate, self.step)
            self.tb.add_scalar("train/in_batch_acc", stats["in_batch_acc"], self.step)
            self.tb.add_scalar("train/lr", lr, self.step)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    rank = int(os.environ.get("RANK", 0))
    run_dir = start_run(cfg) if rank == 0 else str(cfg.run_dir)
    trainer = Trainer(cfg, run_dir)
    try:
        return trainer.fit()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
