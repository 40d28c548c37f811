"""The CUDA path for real: nccl training with a checkpoint and a resume, row-wise sharding with fused
Adam, export, an IVF index built and searched on the GPU, evaluation and search on the GPU agreeing with
the CPU. Skipped without CUDA; run on the GPU machine (one GPU: one process per run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_train import ROOT, complete_steps, train_cmd

from trainer.retrieval import ivf as ix

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ENV = {**os.environ, "TWOTOWER_CHECK_COLLECTIVES": "1"}


def run(cmd, timeout=900):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_nccl_training_checkpoints_and_resumes(tiny_prepared, tmp_path):
    prepared, _ = tiny_prepared
    common = ["trainer.epochs=2", "trainer.checkpoint_every=20"]
    out = run(train_cmd(prepared, tmp_path, *common, "trainer.max_steps=50", nproc=1))
    assert "backend nccl" in out or "nccl" in out.lower()
    assert max(complete_steps(tmp_path)) == 50
    out = run(train_cmd(prepared, tmp_path, *common, nproc=1))
    assert f"resumed from {tmp_path / 'checkpoints' / 'step-00000050'} " in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epoch"] == 2 and len(metrics["val"]) == 2
    assert metrics["val"][-1]["recall@12"] > 0.3


def test_row_wise_sharding_with_fused_adam_then_export_index_evaluate(tiny_prepared, tmp_path):
    prepared, _ = tiny_prepared
    train = tmp_path / "train"
    run(train_cmd(prepared, train, "trainer.epochs=1",
                  "sharding.fused_optimizer=adam", "sharding.fused_lr=0.01",
                  "+sharding.constraints={t_article: {sharding_types: [row_wise]}, "
                  "t_customer_id: {sharding_types: [row_wise]}}", nproc=1))
    val = json.loads((train / "metrics.json").read_text())["val"][-1]["recall@12"]
    assert val > 0.3
    export = tmp_path / "export"
    run([sys.executable, "-m", "trainer.export", f"train_dir={train}", f"hydra.run.dir={export}"])
    run([sys.executable, "-m", "trainer.index", f"export_dir={export}", f"hydra.run.dir={tmp_path / 'index'}"])
    report = json.loads((tmp_path / "index" / "output" / "index_report.json").read_text())
    assert report["built_on"] == "GPU" and report["searched_on"] == "GPU"
    run([sys.executable, "-m", "trainer.evaluate", f"export_dir={export}", f"index_dir={tmp_path / 'noindex'}",
         f"prepare.out={prepared}", f"hydra.run.dir={tmp_path / 'eval'}"])
    ev = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert ev["full_catalogue"]["two-tower"]["recall@12"] == pytest.approx(val, abs=1e-3)  # exact search both


def test_search_on_the_gpu_equals_the_cpu():
    from trainer.retrieval.search import top_k

    rng = np.random.default_rng(0)
    items = rng.normal(size=(5000, 32)).astype(np.float32)
    queries = rng.normal(size=(700, 32)).astype(np.float32)
    off = np.r_[0, np.cumsum(rng.integers(0, 5, 700))]
    seen = (off, rng.integers(0, 5000, off[-1]))
    cpu = top_k(queries, items, 20, exclude_items=[0], seen=seen, device=torch.device("cpu"))
    gpu = top_k(queries, items, 20, exclude_items=[0], seen=seen, device=torch.device("cuda"))
    assert gpu.device.type == "cuda"
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("anchor", ["query", "positive"])
def test_the_miner_on_the_gpu_equals_the_cpu(anchor):
    from trainer.model.negatives import HardNegativeMiner

    rng = np.random.default_rng(1)
    items = torch.from_numpy(rng.normal(size=(3000, 16)).astype(np.float32))
    q = torch.from_numpy(rng.normal(size=(64, 16)).astype(np.float32))
    pos = torch.from_numpy(rng.integers(1, 3000, 64))
    lengths = torch.from_numpy(rng.integers(0, 6, 64))
    values = torch.from_numpy(rng.integers(1, 3000, int(lengths.sum())))
    out = {}
    for dev in ("cpu", "cuda"):
        m = HardNegativeMiner(4, 20, 200, 3000, 16, dev, anchor=anchor)
        m.refresh(items.to(dev))
        out[dev] = m.mine(q.to(dev), pos.to(dev), lengths.to(dev), values.to(dev), 0, 7, 0).cpu()
    assert torch.equal(out["cpu"], out["cuda"])


@pytest.mark.skipif(not ix.gpu_available(), reason="faiss has no GPU support here")
def test_faiss_ivf_on_the_gpu_matches_the_cpu_index():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(64, 32))
    items = (centres[rng.integers(0, 64, 20000)] + 0.1 * rng.normal(size=(20000, 32))).astype(np.float32)
    queries = (centres[rng.integers(0, 64, 500)] + 0.1 * rng.normal(size=(500, 32))).astype(np.float32)
    index = ix.build(items, use_gpu=True)
    cpu = ix.for_search(index, 16, use_gpu=False).search(queries, 12)[1]
    gpu = ix.for_search(index, 16, use_gpu=True).search(queries, 12)[1]
    assert np.mean(np.sort(cpu, 1) == np.sort(gpu, 1)) > 0.99  # the same lists, up to float ties
    rows = ix.sweep(index, items, queries, nprobes=(32,), use_gpu=True)
    assert rows[0]["recall@12"] >= 0.9
