"""Tuning sweeps (trainer/sweep.py, conf/hydra/sweeper/tune.yaml): a real Optuna study through Hydra's
sweeper, each trial a training run; the trials table, the best trial as a preset that reproduces its
metric on two processes, and a sweep killed mid-trial that resumes."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from test_train import ENV, ROOT, complete_steps, run

pytestmark = pytest.mark.slow


def sweep_cmd(prepared: str, sweep_dir: pathlib.Path, n_trials: int) -> list[str]:
    """A small search space over the debug preset, 20 steps a trial (validated at the end)."""
    return [sys.executable, "-m", "trainer.train", "-m", "experiment=debug", f"prepare.out={prepared}",
            "hydra/sweeper=tune", f"hydra.sweep.dir={sweep_dir}", f"hydra.sweeper.n_trials={n_trials}",
            "trainer.max_steps=20", "trainer.epochs=1", "trainer.checkpoint_every=5", "trainer.global_batch_size=512",
            "model.history_encoder=bag", "loss.hard_negatives=0", "model.id_dim=choice(32, 64)", "model.output_dim=64"]


def trials(sweep_dir: pathlib.Path) -> list[dict]:
    with open(sweep_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_a_sweep_reports_its_trials_and_its_best_preset_reproduces(tiny_prepared, tmp_path):
    prepared, _ = tiny_prepared
    sweep = tmp_path / "sweep"
    out = run(sweep_cmd(prepared, sweep, 2))
    rows = trials(sweep)
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    for r in rows:  # the objective is the trial's run's best validation, read back from its directory
        best = json.loads((pathlib.Path(r["run_dir"]) / "metrics.json").read_text())["best"]
        assert float(r["objective"]) == pytest.approx(best["value"]) and int(r["step"]) == best["step"] == 20
        assert "loss.temperature=" in r["params"] and "optim.lr=" in r["params"]
    assert "| trial | state | objective |" in (sweep / "trials.md").read_text()
    best = max(rows, key=lambda r: float(r["objective"]))
    assert f"best trial {best['trial']}" in out.stdout + out.stderr

    # The preset reproduces the best trial on two processes (the same global batch: the same training).
    preset = sweep / "presets" / "experiment" / "tuned.yaml"
    assert preset.exists()
    again = tmp_path / "again"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m",
         "trainer.train", "--config-dir", str(sweep / "presets"), "experiment=tuned", f"prepare.out={prepared}",
         f"hydra.run.dir={again}"])
    got = json.loads((again / "metrics.json").read_text())["best"]["value"]
    assert got == pytest.approx(float(best["objective"]), abs=5e-3)

    # The same command with a larger budget runs only the missing trial.
    out = run(sweep_cmd(prepared, sweep, 3))
    assert "2 trial(s) done, 1 to run" in out.stdout + out.stderr
    assert len(trials(sweep)) == 3


def test_a_sweep_killed_mid_trial_resumes_that_trial_from_its_checkpoint(tiny_prepared, tmp_path):
    prepared, _ = tiny_prepared
    sweep = tmp_path / "sweep"
    cmd = sweep_cmd(prepared, sweep, 2)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=ENV)
    deadline, victim = time.time() + 300, None
    while time.time() < deadline and victim is None:  # the first trial, once it has a checkpoint
        assert proc.poll() is None, "the sweep ended before it could be killed"
        runs = [p for p in sweep.iterdir() if p.is_dir() and (p / "checkpoints").exists()] if sweep.exists() else []
        victim = next((p for p in runs if complete_steps(p)), None)
        time.sleep(0.05)
    assert victim is not None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(complete_steps(victim))
    assert killed_at < 20
    out = run(cmd)
    text = out.stdout + out.stderr
    assert "was running when the sweep stopped: running it again" in text
    assert "0 trial(s) done, 2 to run" in text
    assert f"resumed from {victim / 'checkpoints' / f'step-{killed_at:08d}'}" in (victim / "train.log").read_text()
    rows = trials(sweep)
    assert [r["state"] for r in rows].count("COMPLETE") == 2
    assert rows[0]["state"] == "KILLED (run again)" and rows[1]["run_dir"] == str(victim)


def test_the_preset_keeps_what_a_trial_trained_not_where_or_how_it_ran(tmp_path):
    import yaml

    from trainer.sweep import write_preset

    path = write_preset(["experiment=debug", "model=mf", "loss.temperature=0.1", "trainer.global_batch_size=512",
                         "trainer.progress=false", "trainer.resume=false", "paths.runs=/x", "prepare.out=/y",
                         "hydra.run.dir=/z"], str(tmp_path))
    text = open(path).read()
    assert text.startswith("# @package _global_")
    preset = yaml.safe_load(text)
    assert preset["defaults"] == ["debug", {"override /model": "mf"}, "_self_"]
    assert preset["loss"] == {"temperature": 0.1} and preset["trainer"] == {"global_batch_size": 512}
    assert "paths" not in preset and "prepare" not in preset and "hydra" not in preset
