"""Train the two-tower model with TorchRec under torchrun.

    torchrun --nproc_per_node=2 -m trainer.train data=tiny                 # 2 CPU processes (gloo)
    torchrun --nproc_per_node=8 -m trainer.train data=hm_scale trainer.global_batch_size=65536
    python -m trainer.train experiment=debug                                # one process, seconds

Reads ``prepare.out`` (run data.prepare first). Writes into the run directory: the resolved config,
``checkpoints/step-N`` (resumed automatically when the run's fingerprint matches), TensorBoard scalars
under ``tb/`` and ``metrics.json``; ``PREEMPTED`` when a stop signal ended it early.

The Trainer only composes parts, each in its own module: the model and optimisers (builder), the
stream (data.stream) and the model's input (inputs), the train task and the step runner (task,
pipeline), the saved state (state) and its checkpoints (checkpoint), stop conditions (stops) and
validation (validation, inference).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext

import hydra
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed._shard.sharded_tensor import ShardedTensor

from data import config as _data_config  # noqa: F401  (registers the data configs)
from data.io import join, write_json
from data.lock import output_lock
from data.runinfo import FILE_ONLY, progress_bar, start_run
from data.loader import make_loader
from data.stream import ExampleStream
from trainer import config as _train_config  # noqa: F401  (registers the train configs)
from trainer import distributed as D
from trainer import plots
from trainer.builder import build
from trainer.device import loader_workers, set_precision
from trainer.checkpoint import CheckpointManager
from trainer.fingerprint import fingerprint
from trainer.inference import Embedder, prepared_manifest, recent_sales
from trainer.logs import Scalars, quiet_libraries
from trainer.loss import LogQ
from trainer.negatives import HardNegativeMiner
from trainer.pipeline import Steps, use_pipeline
from trainer.schedule import LRSchedule, stalls
from trainer.state import ModelState, OptimizerState, PerRank, RngState, TrainState
from trainer.stops import FiniteGuard, StopRequested, StopSignal, clear_marker, write_marker
from trainer.task import TrainTask
from trainer.validation import training_purchases, validate

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str, tensorboard: bool = True):
        self.cfg, self.run_dir, loop = cfg, run_dir, cfg.trainer
        quiet_libraries()
        self.dist = D.init(loop.device, loop.backend)
        dev, rank, world = self.dist.device, self.dist.rank, self.dist.world
        prepared = cfg.prepare.out
        self.manifest = prepared_manifest(prepared)
        n_items = int(self.manifest["cardinalities"]["article_id"])
        if loop.global_batch_size <= 0 or loop.global_batch_size % world:
            raise ValueError(f"trainer.global_batch_size={loop.global_batch_size} does not divide over {world} "
                             f"rank(s): choose a multiple of {world}")
        self.built = model = build(cfg, self.manifest["cardinalities"], dev)
        if world > 1 and rank == 0:
            for why in not_invariant(cfg, model.model.plan):
                log.warning("%s: this run is not the same training on another number of ranks", why)
        self.stream = ExampleStream(prepared, loop.global_batch_size, rank=rank, world_size=world, seed=loop.seed,
                                    shuffle_rows=loop.shuffle_rows, num_workers=loader_workers(loop.num_workers, dev),
                                    extra_items=cfg.loss.mixed_negatives)
        self._batches_per_epoch: dict[int, int] = {}
        if rank == 0:
            log.info("training on %d rank(s): global batch %d rows (%d per rank), %d steps an epoch; the same "
                     "training on any number of ranks", world, loop.global_batch_size, loop.global_batch_size // world,
                     self.batches_in(0))
        self.loader = make_loader(self.stream, pin_memory=dev.type == "cuda", packed=True)
        sales = recent_sales(cfg, self.manifest, dev)
        self.embedder = Embedder(model.model, model.keys, prepared, self.manifest, dev, self.stream.tables, sales,
                                 cfg.loss.temperature)
        lc = cfg.loss
        counts = torch.from_numpy(pq.read_table(join(prepared, "item_freq.parquet"))["count"].to_numpy().copy())
        self.logq = LogQ(lc.logq, n_items, counts, lc.streaming_alpha, device=dev)
        self.miner = HardNegativeMiner(lc.hard_negatives, lc.hard_rank_lo, lc.hard_rank_hi, n_items, model.output_dim,
                                       dev, str(lc.hard_anchor)) if lc.hard_negatives > 0 else None
        self.task = TrainTask(model.model, model.keys, lc, self.logq, self.miner, self.stream.tables, n_items,
                              loop.seed, dev, set_precision(loop.precision, dev), sales)
        self.state = TrainState(global_batch_size=loop.global_batch_size, world_size=world)
        self.steps = Steps(model.model, model.dense_optimizer, self.task, model.keys, dev,
                           use_pipeline(loop.pipeline, self.miner is not None, dev, world))
        self.checkpoints = CheckpointManager(cfg.checkpoint_dir or os.path.join(run_dir, "checkpoints"),
                                             self._parts(), fingerprint(cfg, self.manifest), loop.keep_checkpoints,
                                             config=OmegaConf.to_container(cfg, resolve=True))
        self.schedule = LRSchedule(cfg.optim, cfg.sharding.fused_lr, model.dense_optimizer, model.fused_optimizer,
                                   self._total_steps())
        self.stop = StopSignal()
        self.guard = FiniteGuard(dev)
        self.scalars = Scalars(run_dir, tensorboard and rank == 0)
        self._examples, self._t_log = 0, time.perf_counter()  # examples/s between log lines
        self._t_console = float("-inf")  # when a step line last went to the console
        self._running = None  # the current epoch's step runner
        self._seen = None  # validation customers' training purchases (trainer.validate_exclude_seen)

    def _parts(self) -> dict:
        """Everything a checkpoint holds, each part Stateful."""
        model, rank = self.built, self.dist.rank
        parts = {"model": ModelState(model.model), "fused_optimizer": OptimizerState(model.fused_optimizer),
                 "train": self.state, "rng": PerRank(RngState(self.dist.device), rank)}
        if model.dense_optimizer is not None:
            parts["dense_optimizer"] = OptimizerState(model.dense_optimizer)
        if self.logq.mode == "streaming":
            parts["logq"] = self.logq
        if self.miner is not None:
            parts["miner"] = self.miner
        return parts

    # ------------------------------------------------------------ the loop

    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            self.stop.close()

    def _fit(self) -> dict:
        loop, st = self.cfg.trainer, self.state
        clear_marker(self.run_dir)
        self._resume()
        bar = progress_bar(None, loop.progress and self.dist.rank == 0, total=self._total_steps(), initial=st.step,
                           desc="train", mininterval=1.0)
        try:
            if loop.validate and st.validated < st.epoch:  # the last run stopped before validating
                self._validate()
            while st.epoch < loop.epochs and not self._done():
                self._start_epoch()
                self._running = self.steps.run(self.loader)
                for n, loss, stats, pos_ids in self._running:
                    self._after_step(n, loss, stats, pos_ids)
                    bar.update(1)
                    if self._done():
                        break
                    if st.batch_in_epoch == 0:  # the epoch's last batch: let the runner finish the epoch
                        continue
                    if loop.checkpoint_every > 0 and st.step % loop.checkpoint_every == 0:
                        self._save()
                    if st.step % max(1, loop.stop_check_every) == 0 and self.stop.requested():
                        raise StopRequested()
                self.steps.detach()
                if st.batch_in_epoch == 0:  # an epoch ended
                    if loop.validate:
                        self._validate()
                    if self.stop.requested():
                        raise StopRequested()
                    if st.epoch < loop.epochs and not self._done():
                        self._save()
            last = st.history["val"][-1]["step"] if st.history["val"] else None
            if loop.validate and 0 < st.step != last:  # max_steps ended the run mid-epoch: measure where it is
                self._validate()
        except StopRequested:
            bar.close()
            return self._preempted()
        bar.close()
        return self._finish()

    def _total_steps(self) -> int:
        loop = self.cfg.trainer
        total = sum(self.batches_in(e) for e in range(loop.epochs))
        return total if loop.max_steps < 0 else min(loop.max_steps, total)

    def batches_in(self, epoch: int) -> int:
        if epoch not in self._batches_per_epoch:
            self._batches_per_epoch[epoch] = self.stream.batches_per_epoch(epoch)
        return self._batches_per_epoch[epoch]

    def _done(self) -> bool:
        return 0 < self.cfg.trainer.max_steps <= self.state.step or self._patience_spent()

    def _start_epoch(self) -> None:
        st = self.state
        self.stream.set_epoch(st.epoch, start=st.batch_in_epoch)  # mid-epoch after a resume, exactly
        every = self.cfg.loss.hard_every
        if self.miner is not None and ((every == 0 and st.batch_in_epoch == 0) or (every > 0 and st.step % every == 0)):
            self._refresh_miner()
        self._prepare_next_step()

    def _after_step(self, n: int, loss: torch.Tensor, stats: dict, pos_ids: torch.Tensor) -> None:
        st = self.state
        logging_step = self.task.with_stats
        self.task.after_step(pos_ids, st.step + 1)
        st.step += 1
        st.batch_in_epoch += 1
        self.guard.observe(loss, st.step)
        self._examples += n
        if logging_step:
            self.guard.check()
            self._log(loss, stats)
        if st.batch_in_epoch == self.batches_in(st.epoch):  # the epoch is done: a stop now resumes at the next one
            st.epoch += 1
            st.batch_in_epoch = 0
        every = self.cfg.loss.hard_every
        if self.miner is not None and every > 0 and st.step % every == 0 and st.batch_in_epoch:
            self._refresh_miner()
        self._prepare_next_step()

    def _prepare_next_step(self) -> None:
        st = self.state
        self.task.step = st.step
        self.schedule.apply(st.step, self._stalls())
        self.task.with_stats = (st.step + 1) % self.cfg.trainer.log_every == 0 or st.step == 0

    def _refresh_miner(self) -> None:
        self.steps.detach()
        self.miner.refresh(self.embedder.items(check_stop=self.stop.check, scoring=False))

    def _validate(self) -> None:
        st, loop = self.state, self.cfg.trainer
        self.steps.detach()
        if loop.validate_exclude_seen and self._seen is None:
            self._seen = training_purchases(self.embedder.prepared,
                                            self.embedder.eval_rows("val")["customer_idx"].to_numpy())
        metrics = validate(self.embedder, loop.recall_k, check_stop=self.stop.check, seen=self._seen)
        if loop.select_metric not in metrics:
            raise ValueError(f"trainer.select_metric={loop.select_metric!r} is not a validation metric; "
                             f"choose one of {sorted(k for k in metrics if '@' in k or k == 'mrr')}")
        st.history["val"].append({"epoch": st.epoch, "step": st.step, **metrics})
        st.validated = st.epoch
        best = st.history.get("best")
        if best is None or metrics[loop.select_metric] > best["value"]:
            st.history["best"] = {"metric": loop.select_metric, "value": metrics[loop.select_metric],
                                  "step": st.step, "epoch": st.epoch}
        if self.dist.rank == 0:
            log.info("validation after epoch %d%s: %s (best %s %.4f at step %d)", st.epoch,
                     " (bought articles left out)" if self._seen is not None else "", " ".join(
                         f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(("recall", "ndcg", "map"))),
                     loop.select_metric, st.history["best"]["value"], st.history["best"]["step"])
        self.scalars.add(metrics, st.step, "val")

    def _stalls(self) -> int:
        return stalls(self.state.history["val"], self.cfg.trainer.select_metric)

    def _patience_spent(self) -> bool:
        """Early stopping: ``trainer.patience`` validations in a row without a better select_metric."""
        patience, st = self.cfg.trainer.patience, self.state
        if patience <= 0 or "best" not in st.history:
            return False
        since = sum(1 for v in st.history["val"] if v["step"] > st.history["best"]["step"])
        return since >= patience

    # ------------------------------------------------------------ state

    def _resume(self) -> None:
        loop, st = self.cfg.trainer, self.state
        self.checkpoints.prepare(resume=loop.resume)
        loaded = self.checkpoints.load() if loop.resume else None
        if loaded is None:
            return
        batch, world = loop.global_batch_size, self.dist.world
        if st.global_batch_size != batch and st.batch_in_epoch > 0:
            # the position counts batches of another size: the epoch starts over
            if self.dist.rank == 0:
                log.warning("%s was saved with a global batch of %s rows, this run has %d: epoch %d starts over",
                            loaded.path, st.global_batch_size or "per-rank", batch, st.epoch)
            st.batch_in_epoch = 0
        elif loaded.saved_world != world and self.dist.rank == 0:
            log.info("world size changed from %d to %d: the global batch (%d rows) and the position in epoch %d "
                     "are the same, so the training continues as it would have", loaded.saved_world, world, batch,
                     st.epoch)
        st.global_batch_size, st.world_size = batch, world
        if self.dist.rank == 0:
            log.info("resumed from %s (step %d, epoch %d)", loaded.path, st.step, st.epoch)

    def _weights_finite(self) -> bool:
        ok = True
        for v in self.built.model.state_dict().values():
            tensors = [s.tensor for s in v.local_shards()] if isinstance(v, ShardedTensor) else [v]
            ok = ok and all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
        return D.every_rank(ok)

    def _save(self) -> None:
        """A checkpoint, unless the run has gone non-finite (then the run stops with an error)."""
        self.guard.check()
        if not self._weights_finite():
            raise RuntimeError(f"non-finite weights after step {self.state.step}; no checkpoint written")
        if self.state.step > 0:
            best = self.state.history.get("best")
            self.checkpoints.save(self.state.step, best=best)

    def _stop_running(self) -> None:
        """Ends the epoch's step runner (and with it the loader's worker processes) when the run stops
        mid-epoch."""
        if self._running is not None:
            self._running.close()
            self._running = None
        self.steps.detach()

    def _preempted(self) -> dict:
        self._stop_running()
        self._save()
        write_marker(self.run_dir, self.state.step)
        if self.dist.rank == 0:
            log.warning("stop signal %d: checkpointed at step %d and stopped; run again to resume",
                        self.stop.signum or 15, self.state.step)
        return {**self.state.history, "step": self.state.step, "preempted_at": self.state.step}

    def _finish(self) -> dict:
        self._stop_running()
        self._save()
        st = self.state
        out = {"step": st.step, "epoch": st.epoch, "world_size": self.dist.world,
               "global_batch_size": self.cfg.trainer.global_batch_size, **st.history}
        if self.dist.rank == 0:
            write_json(out, join(self.run_dir, "metrics.json"))
            plots.training_curves(st.history, join(self.run_dir, "training.png"), self.cfg.trainer.select_metric)
            if self._patience_spent():
                log.info("early stop: %d validations without a better %s than %.4f (step %d)",
                         self.cfg.trainer.patience, st.history["best"]["metric"], st.history["best"]["value"],
                         st.history["best"]["step"])
        self.scalars.close()
        return out

    def _log(self, loss: torch.Tensor, stats: dict) -> None:
        st, world = self.state, self.dist.world
        plain = stats.get("in_batch_loss", torch.full_like(loss.detach(), float("nan")))
        both = D.all_reduce(torch.stack([loss.detach().float(), plain.float()])) / world
        mean_loss, in_batch_loss = both.tolist()
        now = time.perf_counter()
        per_rank = self._examples / max(now - self._t_log, 1e-9)
        self._examples, self._t_log = 0, now
        lr = self.schedule.lr()
        st.history["train"].append({"step": st.step, "epoch": st.epoch, "loss": mean_loss,
                                    "in_batch_loss": in_batch_loss})
        if self.dist.rank == 0:
            # every logged step goes to the run's log file; to the console one every trainer.console_every_s
            to_console = now - self._t_console >= self.cfg.trainer.console_every_s or st.step == 1
            self._t_console = now if to_console else self._t_console
            log.info("step %d epoch %d in-batch loss %.4f (objective %.4f) in-batch acc %.3f | %.0f ex/s total, "
                     "%.0f ex/s per rank | lr %.2e", st.step, st.epoch, in_batch_loss, mean_loss,
                     stats.get("in_batch_acc", float("nan")), per_rank * world, per_rank, lr,
                     extra=None if to_console else FILE_ONLY)
        self.scalars.add({"loss": mean_loss, "in_batch_loss": in_batch_loss, "examples_per_s": per_rank * world,
                          "lr": lr, "in_batch_acc": stats.get("in_batch_acc", float("nan"))}, st.step, "train")


def not_invariant(cfg, plan) -> list[str]:
    """The settings under which N ranks do not train what one rank trains (README, "Scaling out")."""
    out = []
    if cfg.model.dropout > 0 and str(cfg.model.history_encoder) == "transformer":
        out.append(f"model.dropout={cfg.model.dropout} draws its masks on each rank")
    if not cfg.loss.cross_rank:
        out.append("loss.cross_rank=false gives each rank's rows only its own rows' positives as candidates")
    column = sorted(name for module in plan.plan.values() for name, p in module.items()
                    if p.sharding_type in ("column_wise", "table_column_wise"))
    if column and str(cfg.sharding.fused_optimizer) == "rowwise_adagrad":
        out.append(f"column-wise sharding of {column} under row-wise Adagrad keeps one accumulator per row of "
                   "each column shard")
    return out


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Trains; returns the best validation ``trainer.select_metric``: the objective of a tuning sweep
    (trainer/sweep.py). NaN without validation, or when a stop signal ended the run early (its best so far
    is not the trial's result)."""
    rank = int(os.environ.get("RANK", 0))
    # one run per run directory: a second (a double submission) fails at once naming the first; its
    # rank 0 exits before the process group forms, and torchrun stops the other ranks
    with output_lock(str(cfg.run_dir)) if rank == 0 else nullcontext():
        run_dir = start_run(cfg) if rank == 0 else str(cfg.run_dir)
        trainer = Trainer(cfg, run_dir)
        try:
            out = trainer.fit()
            best = out.get("best")
            return float(best["value"]) if best and "preempted_at" not in out else float("nan")
        finally:
            D.shutdown()


if __name__ == "__main__":
    main()
