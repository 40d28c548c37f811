"""Tuning sweeps: Optuna (TPE) through Hydra's sweeper plugin, made to keep going, resume and report.

    python -m trainer.train -m experiment=movielens hydra/sweeper=tune                # 20 trials, 1 process each
    python -m trainer.train -m data=small hydra/sweeper=tune hydra/launcher=slurm hydra.sweeper.n_jobs=4

The search space is ``conf/hydra/sweeper/tune.yaml`` (override any of it on the command line). Each trial
is one training run in ``<sweep dir>/<its overrides>``; its objective is the run's best validation
``trainer.select_metric``, which trainer.train's entry point returns. On top of hydra-optuna-sweeper:

  * the study lives in ``<sweep dir>/study.db`` (SQLite), so the same command again resumes the sweep:
    it runs only the trials still missing, and a trial that was running when the sweep was killed runs
    again with the same parameters, hence in the same directory, where it resumes from its checkpoint;
  * a trial that fails (a diverged loss, a crash) is recorded as failed and the sweep goes on;
  * at the end, ``trials.md`` and ``trials.csv`` (trial, state, objective, the step it was reached at,
    the trial's overrides, its run directory) and the best trial as an experiment preset:
        python -m trainer.train --config-dir <sweep dir>/presets experiment=tuned
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from typing import Any

logging.getLogger("alembic").setLevel(logging.WARNING)  # optuna's storage: no migration chatter

import optuna  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from hydra.core.utils import JobReturn, JobStatus  # noqa: E402
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

log = logging.getLogger(__name__)

GROUPS = ("data", "split", "model", "loss")  # config groups an override can choose (``experiment``: a preset)
# where and how a trial ran, not what it trained: left out of the preset
NOT_IN_PRESET = ("hydra.", "hydra/", "paths.", "prepare.out", "run_dir", "checkpoint_dir", "trainer.progress",
                 "trainer.resume", "trainer.console_every_s", "trainer.log_every")


class TuningSweep(OptunaSweeperImpl):
    """hydra-optuna-sweeper's sweep with resume, failed trials recorded, and the report (the plugin class
    Hydra instantiates, conf/hydra/sweeper/tune.yaml's ``_target_``, is
    trainer/plugins/hydra_plugins/twotower_tune)."""

    def sweep(self, arguments: list[str]) -> None:
        self._process_searchspace_config()
        space, fixed = create_params_from_overrides(self._parse_sweeper_params_config() + list(arguments))
        for name in fixed:
            space.pop(name, None)
        directions = self._get_directions()
        sweep_dir = str(self.config.hydra.sweep.dir)
        os.makedirs(sweep_dir, exist_ok=True)  # the study's SQLite file lives there
        if len(directions) != 1:
            raise ValueError("hydra/sweeper=tune optimises one objective (the run's best validation metric)")
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                    directions=directions, load_if_exists=True)
        left = self.n_trials - resume(study)
        log.info("study %s in %s: %d trial(s) done, %d to run", study.study_name, self.storage,
                 self.n_trials - max(left, 0), max(left, 0))
        while left > 0:
            trials = [study.ask() for _ in range(min(left, self.n_jobs))]
            overrides = self._configure_trials(trials, space, fixed)
            for trial, trial_overrides in zip(trials, overrides):
                trial.set_user_attr("overrides", list(trial_overrides))
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns):
                value = objective(ret)
                if value is None:
                    log.warning("trial %d failed: %s", trial.number, _failure(ret))
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial, value)
            left -= len(trials)
        rows = trials_table(study, sweep_dir)
        write_tables(rows, sweep_dir)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            log.warning("no trial completed; no preset written")
            return
        best = study.best_trial
        preset = write_preset(best.user_attrs.get("overrides", []), sweep_dir)
        OmegaConf.save(OmegaConf.create({"name": "optuna", "best_params": best.params, "best_value": best.value}),
                       os.path.join(sweep_dir, "optimization_results.yaml"))
        log.info("best trial %d: %s = %.4f with %s; its preset: %s (python -m trainer.train --config-dir %s "
                 "experiment=tuned)", best.number, self.config.trainer.select_metric, best.value, best.params,
                 preset, os.path.join(sweep_dir, "presets"))


def resume(study: optuna.Study) -> int:
    """Trials already run (complete or failed). A trial left running by a killed sweep is marked failed
    and queued again with its parameters: it runs next, in its own directory, from its checkpoint."""
    done = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.RUNNING:
            log.warning("trial %d was running when the sweep stopped: running it again (%s)", t.number, t.params)
            # a finished trial takes no attribute: mark it while it is still running (optuna 2 names a trial's
            # storage id only on the frozen trial)
            optuna.trial.Trial(study, t._trial_id).set_user_attr("requeued", True)
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(t.params)
        elif t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL) \
                and not t.user_attrs.get("requeued"):
            done += 1
    return done


def objective(ret: JobReturn) -> float | None:
    """The trial's objective (trainer.train returns its best validation metric); None if it failed."""
    if ret.status != JobStatus.COMPLETED:
        return None
    try:
        value = float(ret.return_value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _failure(ret: JobReturn) -> str:
    if ret.status != JobStatus.COMPLETED:
        return repr(ret._return_value)
    return f"no finite objective (returned {ret.return_value!r}; did the run validate?)"


# ---------------------------------------------------------------- what a sweep leaves behind


def _run_dirs(sweep_dir: str) -> dict[tuple, str]:
    """Run directories of the sweep by their sorted overrides."""
    out = {}
    for name in sorted(os.listdir(sweep_dir)) if os.path.isdir(sweep_dir) else []:
        path = os.path.join(sweep_dir, name, ".hydra", "overrides.yaml")
        if os.path.exists(path):
            out[tuple(sorted(OmegaConf.load(path)))] = os.path.join(sweep_dir, name)
    return out


def trials_table(study: optuna.Study, sweep_dir: str) -> list[dict[str, Any]]:
    """One row per trial: number, state, objective, the step and epoch of the run's best validation, the
    trial's parameters and its run directory."""
    dirs = _run_dirs(sweep_dir)
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("requeued"):
            state = "KILLED (run again)"
        else:
            state = t.state.name
        run_dir = dirs.get(tuple(sorted(t.user_attrs.get("overrides", []))), "")
        best = {}
        if run_dir and os.path.exists(os.path.join(run_dir, "metrics.json")):
            with open(os.path.join(run_dir, "metrics.json")) as f:
                best = json.load(f).get("best") or {}
        rows.append({"trial": t.number, "state": state, "objective": t.value, "metric": best.get("metric", ""),
                     "step": best.get("step", ""), "epoch": best.get("epoch", ""),
                     "params": " ".join(f"{k}={v}" for k, v in sorted(t.params.items())), "run_dir": run_dir})
    return rows


def write_tables(rows: list[dict[str, Any]], sweep_dir: str) -> None:
    os.makedirs(sweep_dir, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    _write(os.path.join(sweep_dir, "trials.csv"), buf.getvalue())
    ranked = sorted(rows, key=lambda r: -(r["objective"] if r["objective"] is not None else -math.inf))
    lines = ["| trial | state | objective | metric | best step | epoch | parameters | run directory |",
             "|---:|---|---:|---|---:|---:|---|---|"]
    for r in ranked:
        value = f"{r['objective']:.4f}" if r["objective"] is not None else ""
        lines.append(f"| {r['trial']} | {r['state']} | {value} | {r['metric']} | {r['step']} | {r['epoch']} | "
                     f"{r['params']} | {r['run_dir']} |")
    _write(os.path.join(sweep_dir, "trials.md"), "\n".join(lines) + "\n")


def write_preset(overrides: list[str], sweep_dir: str, name: str = "tuned") -> str:
    """The trial's overrides as an experiment preset (``# @package _global_``): presets and config groups
    it chose go into its defaults list, values into the body; where the data and runs live is left out."""
    defaults: list[Any] = []
    body = OmegaConf.create({})
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if key.startswith(NOT_IN_PRESET):
            continue
        if key == "experiment":
            defaults.append(str(o.value()))
        elif key in GROUPS:
            defaults.append({f"override /{key}": str(o.value())})
        else:
            OmegaConf.update(body, key, o.value(), force_add=True)
    text = OmegaConf.to_yaml(OmegaConf.create({"defaults": [*defaults, "_self_"], **OmegaConf.to_container(body)}))
    folder = os.path.join(sweep_dir, "presets", "experiment")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.yaml")
    _write(path, "# @package _global_\n# The best trial of the sweep in " + sweep_dir + "\n" + text)
    return path


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
