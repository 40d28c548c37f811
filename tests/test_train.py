"""End-to-end training under a real `torchrun --nproc_per_node=2` (gloo, CPU), resume after SIGKILL,
and skipping of partial or corrupt checkpoints."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def train_cmd(prepared: str, run_dir: pathlib.Path, *overrides: str, nproc: int = 2) -> list[str]:
    """torchrun on the shared debug preset (conf/experiment/debug.yaml) plus the test's overrides; --standalone
    takes a free port, so no run waits on a port another left behind."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
            "-m", "trainer.train", "experiment=debug", f"prepare.out={prepared}", f"hydra.run.dir={run_dir}",
            *overrides]


# Every collective must go through trainer/parallel/distributed.py (which places tensors where nccl wants them):
# with this set, a direct call from project code fails even in these CPU/gloo runs.
ENV = {**os.environ, "TWOTOWER_CHECK_COLLECTIVES": "1"}


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def complete_steps(run_dir: pathlib.Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name[5:]) for p in folder.glob("step-*") if (p / "run.json").exists()) if folder.exists() else []


def final_weights(run_dir: pathlib.Path) -> dict:
    newest = run_dir / "checkpoints" / f"step-{complete_steps(run_dir)[-1]:08d}"
    out = run_dir / "final.pt"
    dcp_to_torch_save(str(newest), str(out))
    state = torch.load(out, weights_only=True)
    return {k: v for k, v in state["model"].items()}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each worker in its own session, so killing the
    launcher's process group would leave the workers running)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for t in os.listdir(f"/proc/{p}/task")
                    for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except FileNotFoundError:
            continue
        out += kids
        todo += kids
    return out


def sigkill_all(proc: subprocess.Popen) -> int:
    """SIGKILLs the launcher and every worker at once, like a node failure; returns how many died."""
    victims = [proc.pid, *descendants(proc.pid)]
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return len(victims)


def popularity_recall(prepared: str, k: int = 12) -> float:
    ex = pq.read_table(f"{prepared}/examples", columns=["article_idx", "day"])
    day, art = ex["day"].to_numpy(), ex["article_idx"].to_numpy()
    recent = day > day.max() - 7
    top = set(np.argsort(-np.bincount(art[recent]), kind="stable")[:k].tolist())
    targets = pq.read_table(f"{prepared}/eval/val.parquet")["targets"].to_pylist()
    return float(np.mean([len(top & set(t)) / len(t) for t in targets]))


def test_two_process_training_learns_and_beats_popularity(tiny_prepared, tmp_path):
    prepared, _ = tiny_prepared
    run(train_cmd(prepared, tmp_path / "run", "trainer.epochs=3"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    losses = [m["loss"] for m in metrics["train"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 0.5  # the loss decreases
    recall = metrics["val"][-1]["recall@12"]
    pop = popularity_recall(prepared)
    assert recall > 1.2 * pop, (recall, pop)
    # export, evaluate and recommend take the checkpoint the run selected: its best validation
    selected = next(v for v in metrics["val"] if v["step"] == metrics["best"]["step"])
    assert (tmp_path / "run" / "config.yaml").exists()
    assert any((tmp_path / "run" / "tb").iterdir())  # TensorBoard event file

    # Export the 2-rank checkpoint on one process and on two: the same embeddings, to the bit (each row is
    # computed in the same chunk whatever the world size).
    exp1, exp2 = tmp_path / "export1", tmp_path / "export2"
    base = [f"train_dir={tmp_path / 'run'}", "sharding.print_plan=false"]
    run([sys.executable, "-m", "trainer.export", f"hydra.run.dir={exp1}", *base[:1]])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m",
         "trainer.export", f"hydra.run.dir={exp2}", *base[:1]])
    e1 = pq.read_table(exp1 / "output" / "items.parquet")
    e2 = pq.read_table(exp2 / "output" / "items.parquet")
    assert e1["article_id"].equals(e2["article_id"])
    v1 = np.array(e1["embedding"].to_pylist())
    v2 = np.array(e2["embedding"].to_pylist())
    assert np.array_equal(v1, v2)
    assert "the best checkpoint, step" in (exp1 / "export.log").read_text()
    u1 = pq.read_table(exp1 / "output" / "users_val.parquet")
    assert u1.num_rows == pq.read_table(f"{prepared}/eval/val.parquet").num_rows
    # the buying-again mixture's level per customer (trainer/model/repeats.py), the same from either world size
    u2 = pq.read_table(exp2 / "output" / "users_val.parquet")
    assert np.array_equal(u1["repeat_level"].to_numpy(), u2["repeat_level"].to_numpy())
    assert np.isfinite(u1["repeat_level"].to_numpy()).all() and np.ptp(u1["repeat_level"].to_numpy()) > 0

    # Index and evaluate on top: every method reported, the model's numbers match the training run's.
    run([sys.executable, "-m", "trainer.index", f"export_dir={exp1}", f"hydra.run.dir={tmp_path / 'index'}"])
    run([sys.executable, "-m", "trainer.evaluate", f"export_dir={exp1}", f"index_dir={tmp_path / 'noindex'}",
         f"prepare.out={prepared}", f"hydra.run.dir={tmp_path / 'eval'}"])
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    methods = report["full_catalogue"]
    assert {"two-tower", "popularity (last week)", "repurchase + popularity", "co-visitation", "item-kNN",
            "TF-IDF content"} <= set(methods)
    # exact search both times; evaluate scores buying again from the export (the level column), the
    # training run's validation from the live model
    assert methods["two-tower"]["recall@12"] == pytest.approx(selected["recall@12"], abs=1e-3)
    assert methods["popularity (last week)"]["recall@12"] == pytest.approx(pop, abs=1e-6)
    assert "OPTIMISTIC" in (tmp_path / "eval" / "evaluation.md").read_text()

    # A submission for every customer: H&M's format, cold starts counted.
    root = json.loads((pathlib.Path(prepared) / "manifest.json").read_text())["root"]
    run([sys.executable, "-m", "trainer.recommend", f"train_dir={tmp_path / 'run'}", f"index_dir={tmp_path / 'index'}",
         "recommend.submission=true", f"hydra.run.dir={tmp_path / 'rec'}"])
    lines = (tmp_path / "rec" / "submission.csv").read_text().splitlines()
    assert lines[0] == "customer_id,prediction"
    customers = pq.read_table(f"{root}/customers.parquet")["customer_id"].to_pylist()
    assert [line.split(",")[0] for line in lines[1:]] == customers
    for line in lines[1:]:
        preds = line.split(",")[1].split(" ")
        assert len(preds) == 12 and all(len(p) == 10 and p.isdigit() for p in preds)
    counts = json.loads((tmp_path / "rec" / "recommend_report.json").read_text())
    assert counts["model"] + counts["cold_unknown_id"] + counts["cold_no_history"] == len(customers)
    assert counts["cold_no_history"] > 0  # tiny has customers who never bought


def test_resume_after_sigkill_is_bit_exact(tiny_prepared, tmp_path):
    prepared, _ = tiny_prepared
    # two epochs of 46 global batches of 1,024: killed past step 30, it resumes mid-epoch and crosses an epoch's end
    common = ["trainer.epochs=2", "trainer.global_batch_size=1024", "trainer.checkpoint_every=15",
              "trainer.validate=false", "trainer.log_every=5", "trainer.keep_checkpoints=10"]
    run(train_cmd(prepared, tmp_path / "a", *common, "trainer.pipeline=off"))
    # The same run, SIGKILLed (every process) once it has a complete checkpoint past step 30, then restarted;
    # through TorchRec's TrainPipelineSparseDist this time, which must change nothing: it only reorders
    # the embedding input-dist, and checkpoints the position of the last trained batch, not of the
    # batches it has pulled ahead.
    cmd = train_cmd(prepared, tmp_path / "b", *common, "trainer.pipeline=on")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=ENV)
    deadline = time.time() + 300
    ckpt = tmp_path / "b" / "checkpoints"
    while time.time() < deadline:
        if any(s >= 30 for s in complete_steps(tmp_path / "b")):
            break
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    assert sigkill_all(proc) >= 3  # torchrun and its two workers
    killed_at = max(complete_steps(tmp_path / "b"))
    assert killed_at < 90  # it really stopped before the end (2 epochs of 46 steps)
    resumed = run(cmd)
    out = resumed.stdout + resumed.stderr
    assert f"resumed from {ckpt / f'step-{killed_at:08d}'} " in out
    assert "Module 'ebc' will be pipelined" in (tmp_path / "b" / "train.log").read_text()
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # Preemption as Slurm does it: SIGTERM to every process. The ranks agree, checkpoint the step they
    # are at, leave a PREEMPTED marker and stop; a restart resumes and ends the same (unpipelined).
    cmd = train_cmd(prepared, tmp_path / "c", *common, "trainer.pipeline=off")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=ENV)
    log_file = tmp_path / "c" / "train.log"
    while time.time() < deadline + 300:
        if log_file.exists() and "step 20 " in log_file.read_text():
            break
        assert proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)  # raises TimeoutExpired if the stopped run does not exit
    stopped_at = int((tmp_path / "c" / "PREEMPTED").read_text())
    assert 20 <= stopped_at < 92
    assert stopped_at in complete_steps(tmp_path / "c")
    run(cmd)
    assert not (tmp_path / "c" / "PREEMPTED").exists()
    c = final_weights(tmp_path / "c")
    for k in a:
        assert torch.equal(a[k], c[k]), k


def test_partial_and_corrupt_checkpoints(tiny_prepared, tmp_path):
    """A save cut off (no run.json) is removed at the next start; one that is complete but unreadable
    (garbage DCP metadata) is skipped with a warning for the next older one."""
    prepared, _ = tiny_prepared
    common = ["trainer.epochs=1", "trainer.global_batch_size=512", "trainer.validate=false", "trainer.max_steps=10"]
    run_dir = tmp_path / "run"
    run(train_cmd(prepared, run_dir, *common, nproc=1))
    good = run_dir / "checkpoints" / f"step-{complete_steps(run_dir)[-1]:08d}"
    partial = run_dir / "checkpoints" / "step-00000500"  # no run.json: a save that was cut off
    partial.mkdir()
    (partial / ".metadata").write_bytes(b"half")
    leftover = run_dir / "checkpoints" / ".step-00000600.partial"
    leftover.mkdir()
    corrupt = run_dir / "checkpoints" / "step-00000900"  # complete, same run, but its data is garbage
    corrupt.mkdir()
    (corrupt / ".metadata").write_bytes(b"not a checkpoint")
    info = json.loads((good / "run.json").read_text())
    (corrupt / "run.json").write_text(json.dumps({**info, "step": 900, "seq": info["seq"] + 1}))
    proc = run(train_cmd(prepared, run_dir, *common[:-1], "trainer.max_steps=12", nproc=1))
    out = proc.stdout + proc.stderr
    assert "skipping unreadable checkpoint" in out and "step-00000900" in out
    assert "removing incomplete checkpoint" in out and not partial.exists() and not leftover.exists()
    assert f"resumed from {good}" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 12


def test_mined_hard_negatives_train_unpipelined(tiny_prepared, tmp_path):
    """loss=hard_negatives on 2 ranks: the miner's second table lookup runs unpipelined (auto), the
    model learns, and pipeline=on is refused with a reason."""
    prepared, _ = tiny_prepared
    common = ["loss=hard_negatives"]
    run(train_cmd(prepared, tmp_path / "run", *common, "trainer.epochs=2"))
    log = (tmp_path / "run" / "train.log").read_text()  # TorchRec's lines go to the log file only
    assert "GreedyPerfPartitioner" in log and "will be pipelined" not in log
    recall = json.loads((tmp_path / "run" / "metrics.json").read_text())["val"][-1]["recall@12"]
    assert recall > 1.2 * popularity_recall(prepared), recall
    refused = subprocess.run(train_cmd(prepared, tmp_path / "on", *common, "trainer.pipeline=on"),
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0
    assert "cannot run with loss.hard_negatives" in refused.stdout + refused.stderr


def test_sigterm_to_every_process_with_loader_workers(tiny_prepared, tmp_path):
    """Slurm's SIGTERM reaches every process of the step, data-loader workers included: the workers
    leave it to the trainer, which checkpoints the step it is at and stops; a restart finishes the run."""
    prepared, _ = tiny_prepared
    common = ["trainer.epochs=1", "trainer.validate=false", "trainer.log_every=5",
              "trainer.num_workers=2"]
    cmd = train_cmd(prepared, tmp_path, *common, nproc=1)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=ENV)
    log_file, deadline = tmp_path / "train.log", time.time() + 300
    while time.time() < deadline and not (log_file.exists() and "step 20 " in log_file.read_text()):
        assert proc.poll() is None
        time.sleep(0.05)
    victims = [proc.pid, *descendants(proc.pid)]
    assert len(victims) >= 4  # torchrun, the trainer and its two loader workers
    for p in victims:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    proc.wait(timeout=120)
    stopped_at = int((tmp_path / "PREEMPTED").read_text())
    assert stopped_at in complete_steps(tmp_path)
    out = run(cmd)
    assert f"resumed from {tmp_path / 'checkpoints' / f'step-{stopped_at:08d}'} " in out.stdout + out.stderr
    from data.stream import ExampleStream
    per_epoch = ExampleStream(prepared, 512).batches_per_epoch(0)  # whatever the loader workers
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == per_epoch


def test_transformer_history_trains_pipelined_on_two_ranks(tiny_prepared, tmp_path):
    """The sequence encoder under TorchRec's pipeline: its FX trace must get through the model."""
    prepared, _ = tiny_prepared
    run(train_cmd(prepared, tmp_path, "trainer.epochs=1", "trainer.max_steps=20",
                  "trainer.validate=false", "trainer.pipeline=on", "model.history_encoder=transformer",
                  "model.history_positions=8"))
    assert "Module 'ebc' will be pipelined" in (tmp_path / "train.log").read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 20
