"""slurm/ against a real single-node Slurm: sbatch training, preemption and requeue, a dependent
pipeline chain, and a Hydra multirun sweep through the submitit launcher."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest
import torch
from test_train import final_weights

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slurm, pytest.mark.slow,
    # Starting (or installing) Slurm needs root; elsewhere deselect with -m "not slurm" or run as root.
    pytest.mark.skipif(os.geteuid() != 0 and not shutil.which("slurmctld"),
                       reason="Slurm is not installed and installing it needs root"),
]
# Two epochs of 46 global batches of 1,024: a preemption at step 20 resumes mid-epoch and crosses an epoch's end.
COMMON = ["experiment=debug", "trainer.epochs=2", "trainer.global_batch_size=1024", "trainer.checkpoint_every=15",
          "trainer.validate=false", "trainer.log_every=5", "trainer.keep_checkpoints=10"]


def submit_train(slurm, prepared: str, run_dir: pathlib.Path, name: str) -> int:
    return slurm.sbatch(f"--job-name={name}", "--cpus-per-task=2", f"--output={run_dir.parent}/{name}-%j.out",
                        str(ROOT / "slurm" / "train.sbatch"), f"prepare.out={prepared}", *COMMON,
                        env={"NPROC_PER_NODE": "2", "RUN_DIR": str(run_dir), "TWOTOWER_ROOT": str(ROOT),
                             "TWOTOWER_PYTHON": sys.executable}, cwd=str(ROOT))


@pytest.fixture(scope="module")
def uninterrupted(slurm, tiny_prepared, tmp_path_factory):
    prepared, _ = tiny_prepared
    run_dir = tmp_path_factory.mktemp("slurm-runs") / "plain"
    job = submit_train(slurm, prepared, run_dir, "plain")
    state = slurm.wait(job)
    out = "".join(p.read_text() for p in run_dir.parent.glob("plain-*.out"))
    assert state == "COMPLETED", out[-3000:]
    return run_dir, out


def test_train_sbatch_completes(uninterrupted):
    run_dir, out = uninterrupted
    assert "1 node(s) x 2" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epoch"] == 2 and metrics["step"] > 0
    assert any((p / "run.json").exists() for p in (run_dir / "checkpoints").glob("step-*"))


def test_requeue_resumes_from_checkpoint_bit_exact(slurm, tiny_prepared, uninterrupted, tmp_path):
    prepared, _ = tiny_prepared
    run_dir = tmp_path / "preempted"
    job = submit_train(slurm, prepared, run_dir, "preempted")
    deadline = time.time() + 300
    log = run_dir / "train.log"
    while time.time() < deadline and not (log.exists() and "step 20 " in log.read_text()):
        assert slurm.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), slurm.job_state(job)
        time.sleep(0.2)
    slurm.scontrol("requeue", str(job))  # what preemption does: SIGTERM to every process, job back in queue
    # (Slurm holds a requeued job back for a while; starting it earlier fails on its revoked credential.)
    state = slurm.wait(job, timeout=900)
    out = "".join(p.read_text() for p in tmp_path.glob("preempted-*.out"))
    assert state == "COMPLETED", out[-3000:]
    assert "restart 1" in out  # the job ran a second time
    text = log.read_text()
    assert "stop signal 15: checkpointed at step" in text and "resumed from" in text
    ref, got = final_weights(uninterrupted[0]), final_weights(run_dir)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_time_limit_warning_checkpoints_and_requeues_itself(slurm, tiny_prepared, uninterrupted, tmp_path):
    """USR1 to the batch script (what --signal=B:USR1@T sends before the time limit): the script
    forwards SIGTERM, the ranks checkpoint and leave PREEMPTED, and the script requeues its own job."""
    prepared, _ = tiny_prepared
    run_dir = tmp_path / "warned"
    job = submit_train(slurm, prepared, run_dir, "warned")
    log = run_dir / "train.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and "step 20 " in log.read_text()):
        assert slurm.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), slurm.job_state(job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=slurm.env, check=True)
    # The script requeues its own job; wait for the second run to end (Slurm holds a requeued job
    # back for a while), never judging the first run's transient end as the result.
    deadline = time.time() + 900
    out, state = "", ""
    while time.time() < deadline:
        out = "".join(p.read_text() for p in tmp_path.glob("warned-*.out"))
        state = slurm.job_state(job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and ("restart 1" in out or state != "COMPLETED"):
            break
        time.sleep(1)
    assert state == "COMPLETED", out[-3000:]
    assert "USR1: time limit near" in out and "requeueing job" in out and "restart 1" in out
    ref, got = final_weights(uninterrupted[0]), final_weights(run_dir)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_a_stale_preempted_marker_does_not_requeue_a_crash(slurm, tiny_prepared, tmp_path):
    """A PREEMPTED left by an earlier run, and a run that crashes (here at config composition, before
    the trainer starts): the job ends FAILED, it is not requeued."""
    prepared, _ = tiny_prepared
    run_dir = tmp_path / "stale"
    run_dir.mkdir()
    (run_dir / "PREEMPTED").write_text("15\n")
    job = slurm.sbatch("--job-name=stale", "--cpus-per-task=2", f"--output={tmp_path}/stale-%j.out",
                       str(ROOT / "slurm" / "train.sbatch"), f"prepare.out={prepared}", "trainer.epochs=oops",
                       env={"NPROC_PER_NODE": "1", "MAX_RESTARTS": "0", "RUN_DIR": str(run_dir),
                            "TWOTOWER_ROOT": str(ROOT), "TWOTOWER_PYTHON": sys.executable}, cwd=str(ROOT))
    state = slurm.wait(job, timeout=600)
    out = "".join(p.read_text() for p in tmp_path.glob("stale-*.out"))
    assert state == "FAILED", out[-3000:]
    assert "requeueing" not in out and "restart 1" not in out
    assert not (run_dir / "PREEMPTED").exists()


def test_pipeline_chain_runs_in_dependency_order(slurm, tiny_prepared, tmp_path):
    prepared, _ = tiny_prepared
    root = pathlib.Path(json.loads((pathlib.Path(prepared) / "manifest.json").read_text())["root"])
    env = {**slurm.env, "RUN_DIR": str(tmp_path / "chain"), "PIPELINE_NAME": "chain", "NPROC_PER_NODE": "2",
           "TWOTOWER_ROOT": str(ROOT), "TWOTOWER_PYTHON": sys.executable,
           "STAGE_SBATCH": f"--output={tmp_path}/%x-%j.out", "TRAIN_SBATCH": f"--cpus-per-task=2 --output={tmp_path}/%x-%j.out",
           "TRAIN_ARGS": "trainer.epochs=1 trainer.max_steps=20 trainer.validate=false sharding.print_plan=false"}
    out = subprocess.run(["bash", str(ROOT / "slurm" / "submit_pipeline.sh"), f"data={root.name}",
                          f"paths.datasets={root.parent}", f"paths.runs={tmp_path}/runs"],
                         env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    jobs = [int(j) for j in out.stdout.split()]
    assert len(jobs) == 5
    for job in jobs:
        assert slurm.wait(job, timeout=900) == "COMPLETED", "".join(p.read_text() for p in tmp_path.glob("*.out"))[-3000:]
    report = json.loads((tmp_path / "chain-evaluate" / "evaluation.json").read_text())
    assert "two-tower" in report["full_catalogue"]


def test_the_weekly_chain_runs_as_dependent_jobs(slurm, tiny_drops, tmp_path):
    """slurm/submit_weekly.sh: data, training (train.sbatch, 2 ranks) and the rest as three jobs in order;
    the week ends published."""
    chain = tmp_path / "chain"
    env = {**slurm.env, "PIPELINE_NAME": "weekly", "NPROC_PER_NODE": "2", "TWOTOWER_ROOT": str(ROOT),
           "TWOTOWER_PYTHON": sys.executable, "STAGE_SBATCH": f"--output={tmp_path}/%x-%j.out",
           "TRAIN_SBATCH": f"--cpus-per-task=2 --output={tmp_path}/%x-%j.out"}
    out = subprocess.run(["bash", str(ROOT / "slurm" / "submit_weekly.sh"), "--chain", str(chain), "--drop",
                          f"{tiny_drops['out']}/week-01", "--train-args",
                          "experiment=debug trainer.max_steps=10 trainer.validate=false", "data=tiny",
                          f"paths.runs={tmp_path}/runs"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = [int(j) for j in out.stdout.split()]
    assert len(jobs) == 3
    for job in jobs:
        assert slurm.wait(job, timeout=900) == "COMPLETED", "".join(p.read_text() for p in tmp_path.glob("*.out"))[-3000:]
    assert json.loads((chain / "chain.json").read_text())["weeks"] == ["week-01"]
    assert json.loads((chain / "week-01" / "train" / "metrics.json").read_text())["world_size"] == 2
    assert (chain / "serving" / "output" / "manifest.json").exists()


def test_multirun_sweep_through_submitit(slurm, tiny_prepared, tmp_path):
    prepared, _ = tiny_prepared
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "trainer.train", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}",
           f"prepare.out={prepared}", "trainer.epochs=1", "trainer.max_steps=15", "trainer.validate=false",
           "trainer.global_batch_size=512", "trainer.progress=false", "sharding.print_plan=false",
           "hydra.launcher.cpus_per_task=1", "loss.temperature=0.05,0.1"]
    proc = subprocess.run(cmd, env=slurm.env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    points = sorted(p.name for p in sweep.iterdir() if (p / "metrics.json").exists())
    assert points == ["loss.temperature=0.05,trainer.global_batch_size=512", "loss.temperature=0.1,trainer.global_batch_size=512"]
    for p in points:
        assert json.loads((sweep / p / "metrics.json").read_text())["step"] == 15
    # Re-submitting the same sweep resumes each point from its checkpoint instead of starting over.
    proc = subprocess.run(cmd[:-4] + ["trainer.max_steps=20", *cmd[-3:]], env=slurm.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for p in points:
        assert "resumed from" in (sweep / p / "train.log").read_text()
        assert json.loads((sweep / p / "metrics.json").read_text())["step"] == 20


def test_tuning_sweep_through_submitit(slurm, tiny_prepared, tmp_path):
    """hydra/sweeper=tune on the Slurm launcher: two trials as the two tasks of a Slurm array job, at once,
    each returning its best validation metric to the study; the trials table and the best preset are
    written."""
    prepared, _ = tiny_prepared
    sweep = tmp_path / "tune"
    cmd = [sys.executable, "-m", "trainer.train", "-m", "hydra/launcher=slurm", "hydra/sweeper=tune",
           f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
           "hydra.launcher.cpus_per_task=1", f"prepare.out={prepared}", "experiment=debug", "trainer.epochs=1",
           "trainer.max_steps=15", "trainer.global_batch_size=512", "model.history_encoder=bag",
           "loss.hard_negatives=0", "model.id_dim=64", "model.output_dim=64"]
    proc = subprocess.run(cmd, env=slurm.env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = (sweep / "trials.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",COMPLETE," in r for r in rows[1:]), rows
    assert (sweep / "presets" / "experiment" / "tuned.yaml").exists()
    assert len([p for p in sweep.glob(".submitit/*_*") if p.is_dir()]) == 2  # one array job, two tasks
