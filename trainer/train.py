"""Train the two-tower model with TorchRec under torchrun.

    torchrun --nproc_per_node=2 -m trainer.train data=tiny                 # 2 CPU processes (gloo)
    torchrun --nproc_per_node=8 -m trainer.train data=hm_scale trainer.global_batch_size=65536
    python -m trainer.train experiment=debug                                # one process, seconds

Reads ``prepare.out``; writes into the run directory its config, ``checkpoints/step-N`` (resumed when the
fingerprint matches), ``tb/``, ``metrics.json``, and ``PREEMPTED`` when a stop signal ended it early. The
loop counts global steps; everything else is built once (trainer/loop/builder.py) or is a component with its
own state in trainer/loop/ (validator: validation, best checkpoint, early stopping; logs; checkpoint; stops)."""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext

import hydra
from omegaconf import DictConfig, OmegaConf

from data import config as _data_config  # noqa: F401  (registers the data configs)
from data.io import join, write_json
from data.lock import output_lock
from data.prepared import Prepared
from data.runinfo import progress_bar, start_run
from trainer import config as _train_config  # noqa: F401  (registers the train configs)
from trainer.loop import stops
from trainer.loop.builder import build_training
from trainer.loop.checkpoint import CheckpointManager
from trainer.loop.fingerprint import fingerprint
from trainer.loop.logs import Scalars, StepLogger, quiet_libraries
from trainer.loop.state import TrainState
from trainer.loop.validator import Validator
from trainer.loop.warm_start import record, warm_start
from trainer.model.negatives import StepAt
from trainer.model.towers import RENAMED
from trainer.parallel import distributed as D

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str, tensorboard: bool = True):
        self.cfg, self.run_dir, loop = cfg, run_dir, cfg.trainer
        quiet_libraries()
        self.dist = D.init(loop.device, loop.backend)
        self.ds = Prepared.read(cfg.prepare.out)
        warm_start_rates(cfg)
        self.parts = p = build_training(cfg, self.ds, self.dist)
        self.built, self.stream, self.loader, self.embedder = p.built, p.stream, p.loader, p.embedder
        self.task, self.steps = p.task, p.steps
        rank, world = self.dist.rank, self.dist.world
        self.state = TrainState(global_batch_size=loop.global_batch_size, world_size=world)
        self.checkpoints = CheckpointManager(cfg.checkpoint_dir or os.path.join(run_dir, "checkpoints"),
                                             p.checkpoint_parts(self.state, self.dist.device, rank),
                                             fingerprint(cfg, self.ds), loop.keep_checkpoints,
                                             config=OmegaConf.to_container(cfg, resolve=True), renamed=RENAMED,
                                             record={"data": {"prepared": self.ds.url, "version": self.ds.version,
                                                              "lineage": list(self.ds.lineage.versions)}})
        self.parent: dict | None = None  # the warm start's parent run (trainer.init_from), once known
        self.stop, self.guard = stops.StopSignal(), stops.FiniteGuard(self.dist.device)
        self.scalars = Scalars(run_dir, tensorboard and rank == 0)
        self.validator = Validator(loop, self.embedder, self.state, self.scalars, self.stop.check, rank)
        self.logger = StepLogger(loop, self.state, self.scalars, world, rank)
        self._running = None  # the current epoch's step runner

    # ------------------------------------------------------------ the loop

    def fit(self) -> dict:
        loop, st = self.cfg.trainer, self.state
        stops.clear_marker(self.run_dir)
        self._resume()
        bar = progress_bar(None, loop.progress and self.dist.rank == 0, total=self.parts.total_steps,
                           initial=st.step, desc="train", mininterval=1.0)
        try:
            if self.validator.missed():  # the last run stopped before validating
                self._validate()
            while st.epoch < loop.epochs and not self._done():
                self._step_hooks(epoch_start=True)
                self.stream.set_epoch(st.epoch, start=st.batch_in_epoch)  # mid-epoch after a resume, exactly
                self._running = self.steps.run(self.loader)
                for n, loss, stats, pos_ids in self._running:
                    self._after_step(n, loss, stats, pos_ids)
                    bar.update(1)
                    if self._done():
                        break
                    if st.batch_in_epoch == 0:  # the epoch's last batch: let the runner finish the epoch
                        continue
                    self._step_hooks(epoch_start=False)
                    if loop.checkpoint_every > 0 and st.step % loop.checkpoint_every == 0:
                        self._save()
                    if st.step % max(1, loop.stop_check_every) == 0 and self.stop.requested():
                        raise stops.StopRequested()
                self.steps.detach()
                if st.batch_in_epoch == 0:  # an epoch ended
                    if self.validator.enabled:
                        self._validate()
                    if self.stop.requested():
                        raise stops.StopRequested()
                    if st.epoch < loop.epochs and not self._done():
                        self._save()
            if self.validator.unmeasured_end():  # max_steps ended the run mid-epoch: measure where it is
                self._validate()
            return self._end(preempted=False)
        except stops.StopRequested:
            return self._end(preempted=True)
        finally:  # after the final checkpoint: a stop signal until then is deferred, not fatal
            bar.close()
            self.stop.close()

    def _done(self) -> bool:
        return 0 < self.cfg.trainer.max_steps <= self.state.step or self.validator.patience_spent()

    def _after_step(self, n: int, loss, stats: dict, pos_ids) -> None:
        """Counts the step, checks and logs its loss, moves the position (past an epoch's end: the next)."""
        st, logged = self.state, self.task.with_stats
        self.task.after_step(pos_ids, st.step + 1)
        st.step += 1
        st.batch_in_epoch += 1
        self.guard.observe(loss, st.step)
        self.logger.count(n)
        if logged:
            self.guard.check()
            self.logger.log(loss, stats, self.parts.schedule.lr())
        if st.batch_in_epoch == self.stream.batches_per_epoch(st.epoch):
            st.epoch, st.batch_in_epoch = st.epoch + 1, 0

    def _step_hooks(self, epoch_start: bool) -> None:
        """Before the next step: every component on its own schedule (negative sources, the task), the rates."""
        st = self.state
        at = StepAt(st.step, st.epoch, st.batch_in_epoch, epoch_start, self.logger.due(st.step), self.stop.check)
        for component in self.parts.components:
            component.before_step(at)
        self.parts.schedule.apply(st.step, self.validator.stalls())

    def _validate(self) -> None:
        self.steps.detach()
        self.validator.run()

    # ------------------------------------------------------------ state

    def _resume(self) -> None:
        """This run's newest checkpoint when there is one (a warm-started run continues, not its parent);
        else, with trainer.init_from, the parent run's weights and optimiser state."""
        loop, st = self.cfg.trainer, self.state
        self.checkpoints.prepare(resume=loop.resume)
        loaded = self.checkpoints.load() if loop.resume else None
        if loaded is not None:
            st.continue_as(loop.global_batch_size, self.dist.world, loaded.path, loaded.saved_world,
                           tell=self.dist.rank == 0)
            self.parent = loaded.info.get("warm_start")
        elif loop.init_from:
            parent = warm_start(str(loop.init_from), str(loop.init_checkpoint), self.checkpoints.parts, self.ds,
                                self.checkpoints.fingerprint, RENAMED, tell=self.dist.rank == 0,
                                optimizer=bool(loop.init_optimizer))
            self.parent = record(parent)
        self.checkpoints.record["warm_start"] = self.parent

    def _save(self) -> None:
        """A checkpoint, unless the run has gone non-finite (then the run stops with an error)."""
        self.guard.check()
        if not stops.weights_finite(self.built.model):
            raise RuntimeError(f"non-finite weights after step {self.state.step}; no checkpoint written")
        if self.state.step > 0:
            self.checkpoints.save(self.state.step, best=self.validator.best())

    def _end(self, preempted: bool) -> dict:
        """The final checkpoint; a stop signal leaves PREEMPTED, a finished run metrics.json and its plot."""
        if self._running is not None:  # ends the step runner and the loader's worker processes
            self._running.close()
            self._running = None
        self.steps.detach()
        self._save()
        st, loop = self.state, self.cfg.trainer
        if preempted:
            stops.write_marker(self.run_dir, st.step)
            if self.dist.rank == 0:
                log.warning("stop signal %d: checkpointed at step %d and stopped; run again to resume",
                            self.stop.signum or 15, st.step)
            return {**st.history, "step": st.step, "preempted_at": st.step}
        out = {"step": st.step, "epoch": st.epoch, "world_size": self.dist.world,
               "global_batch_size": loop.global_batch_size, "warm_start": self.parent,
               "examples_trained": st.step * loop.global_batch_size,  # global batches are whole
               "compiled": self.steps.compiled, "compile_seconds": self.steps.compile_seconds,
               "follows_data": self.parts.follows_data, **st.history}
        if self.dist.rank == 0:
            write_json(out, join(self.run_dir, "metrics.json"))
            from trainer.evaluation import plots  # here: matplotlib costs every rank half a second at start-up

            plots.training_curves(st.history, join(self.run_dir, "training.png"), loop.select_metric)
        self.validator.log_early_stop()
        self.scalars.close()
        return out


def warm_start_rates(cfg: DictConfig) -> None:
    """A warm start's learning rates: ``trainer.init_lr_scale`` of the configured ones (the run's recorded
    config holds the rates it ran at; a resumed warm start scales the composed config the same way)."""
    loop = cfg.trainer
    scale = float(loop.init_lr_scale)
    if not loop.init_from or scale == 1.0:
        return
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"trainer.init_lr_scale={scale}: expected a share of the rates in (0, 1]")
    cfg.sharding.fused_lr = float(cfg.sharding.fused_lr) * scale
    cfg.optim.lr = float(cfg.optim.lr) * scale
    log.info("warm start: learning rates x%g (trainer.init_lr_scale): tables %g, dense %g", scale,
             cfg.sharding.fused_lr, cfg.optim.lr)


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
