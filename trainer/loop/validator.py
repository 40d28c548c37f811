"""The training run's validation component: ranks the validation customers (trainer/evaluation/validation.py) after
each epoch, and from the metrics it keeps decides the best checkpoint (``trainer.select_metric``), early
stopping (``trainer.patience``) and the plateau schedule's stalls. Its state is the train state's
history (``val`` and ``best``), so it is saved and resumed with every checkpoint."""

from __future__ import annotations

import logging

from trainer.evaluation.purchases import training_purchases
from trainer.evaluation.validation import validate
from trainer.loop.schedule import stalls

log = logging.getLogger(__name__)


def validation_metrics(recall_k) -> list[str]:
    """The metrics validation reports (trainer/evaluation/metrics.py at ``trainer.recall_k``)."""
    return [f"{m}@{int(k)}" for m in ("recall", "ndcg", "hitrate") for k in recall_k] + ["map@12", "mrr", "coverage"]


class Validator:
    def __init__(self, loop_cfg, embedder, state, scalars, check_stop, rank: int):
        self.cfg, self.embedder, self.state, self.scalars = loop_cfg, embedder, state, scalars
        self.check_stop, self.rank = check_stop, rank
        self._seen = None  # validation customers' training purchases (trainer.validate_exclude_seen)
        known = validation_metrics(loop_cfg.recall_k)
        if loop_cfg.validate and loop_cfg.select_metric not in known:  # now, not after the first epoch
            raise ValueError(f"trainer.select_metric={loop_cfg.select_metric!r} is not a validation metric; choose "
                             f"one of {known} (the @K ones follow trainer.recall_k)")

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.validate)

    def run(self) -> dict:
        """Validates at the current step and records the metrics, and the best so far."""
        st, cfg = self.state, self.cfg
        if cfg.validate_exclude_seen and self._seen is None:
            self._seen = training_purchases(self.embedder.prepared,
                                            self.embedder.eval_rows("val")["customer_idx"].to_numpy())
        metrics = validate(self.embedder, cfg.recall_k, check_stop=self.check_stop, seen=self._seen)
        if cfg.select_metric not in metrics:
            raise ValueError(f"trainer.select_metric={cfg.select_metric!r} is not a validation metric; "
                             f"choose one of {sorted(k for k in metrics if '@' in k or k == 'mrr')}")
        st.history["val"].append({"epoch": st.epoch, "step": st.step, **metrics})
        st.validated = st.epoch
        best = st.history.get("best")
        if best is None or metrics[cfg.select_metric] > best["value"]:
            st.history["best"] = {"metric": cfg.select_metric, "value": metrics[cfg.select_metric],
                                  "step": st.step, "epoch": st.epoch}
        if self.rank == 0:
            log.info("validation after epoch %d%s: %s (best %s %.4f at step %d)", st.epoch,
                     " (bought articles left out)" if self._seen is not None else "", " ".join(
                         f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(("recall", "ndcg", "map"))),
                     cfg.select_metric, st.history["best"]["value"], st.history["best"]["step"])
        self.scalars.add(metrics, st.step, "val")
        return metrics

    def missed(self) -> bool:
        """The last run stopped after an epoch ended but before its validation."""
        return self.enabled and self.state.validated < self.state.epoch

    def unmeasured_end(self) -> bool:
        """The run ended (max_steps, mid-epoch) where it has not validated."""
        st = self.state
        last = st.history["val"][-1]["step"] if st.history["val"] else None
        return self.enabled and 0 < st.step != last

    def best(self) -> dict | None:
        return self.state.history.get("best")

    def stalls(self) -> int:
        """Validations since the best (the plateau schedule halves the rates per stall)."""
        return stalls(self.state.history["val"], self.cfg.select_metric)

    def patience_spent(self) -> bool:
        """Early stopping: ``trainer.patience`` validations in a row without a better select_metric."""
        st = self.state
        if self.cfg.patience <= 0 or "best" not in st.history:
            return False
        since = sum(1 for v in st.history["val"] if v["step"] > st.history["best"]["step"])
        return since >= self.cfg.patience

    def log_early_stop(self) -> None:
        if self.rank == 0 and self.patience_spent():
            best = self.best()
            log.info("early stop: %d validations without a better %s than %.4f (step %d)", self.cfg.patience,
                     best["metric"], best["value"], best["step"])
