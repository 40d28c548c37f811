"""Device choice and the collective helpers (trainer/parallel/distributed.py)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.parallel import distributed as D


def test_device_choice(monkeypatch):
    assert D.choose_device("cpu", 0, 1).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.choose_device("auto", 0, 2).type == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        D.choose_device("cuda", 0, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert D.choose_device("auto", 0, 1) == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match="2 processes on this node but 1 GPU"):
        D.choose_device("auto", 1, 2)  # never asks for cuda:1 on a one-GPU machine


def test_a_direct_collective_from_project_code_is_caught(monkeypatch):
    """What nccl would reject at run time (a tensor not placed by the helpers) fails in a gloo run too."""
    monkeypatch.setenv(D.CHECK_ENV, "1")
    originals = {name: getattr(dist, name) for name in D._COLLECTIVES}
    try:
        D.init("cpu")
        flag = torch.tensor([1])
        with pytest.raises(RuntimeError, match="called directly from tests/test_distributed.py"):
            dist.all_reduce(flag)
        assert D.any_rank(1) and D.every_rank(True)
        assert torch.equal(D.all_reduce(torch.tensor([2.0])), torch.tensor([2.0]))
    finally:
        D.shutdown()
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _gather_rows(rank: int, world: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = torch.arange(rank * 10, rank * 10 + rank + 1, dtype=torch.float32)[:, None].repeat(1, 3)  # rank+1 rows
    got = D.all_gather_rows(rows)
    flags = [D.any_rank(rank == 1), D.every_rank(rank == 1)]
    out[rank] = (got.tolist(), flags)
    dist.destroy_process_group()


def test_all_gather_rows_with_uneven_ranks():
    init_file = tempfile.NamedTemporaryFile(delete=False).name
    os.remove(init_file)
    out = mp.Manager().dict()
    mp.spawn(_gather_rows, args=(2, init_file, out), nprocs=2)
    want = [[0.0] * 3, [10.0] * 3, [11.0] * 3]
    for rank in (0, 1):
        assert out[rank] == (want, [True, False])
