"""trainer/parallel/compile.py: the compiled dense step trains what the eager step trains, on one rank and on
four (real torchrun jobs, gloo, inductor's C++ kernels on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_invariance import EVERYTHING, assert_same_weights, losses, train
from test_train import final_weights

from trainer.parallel.compile import wanted


def test_auto_compiles_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [wanted(m, cpu) for m in ("auto", "on", "off")] == [False, True, False]
    assert [wanted(m, cuda) for m in ("auto", "on", "off")] == [True, True, False]
    with pytest.raises(ValueError):
        wanted("always", cpu)


@pytest.mark.slow
def test_four_compiled_ranks_train_what_one_eager_rank_trains(tiny_prepared, tmp_path):
    """One comparison for both: compiled = eager, and N ranks = one rank with the compile on (a difference
    in either shows). Compiled in place, the modules keep their parameter names: the compiled run's
    checkpoint holds the eager run's keys (assert_same_weights). Nothing is compiled in the test process
    itself: the loader tests fork worker processes from it."""
    prepared, _ = tiny_prepared
    common = [*EVERYTHING, "trainer.max_steps=50", "trainer.epochs=1", "trainer.validate=false"]
    eager = train(prepared, tmp_path / "eager", 1, *common, "trainer.compile=off")
    four = train(prepared, tmp_path / "four", 4, *common, "trainer.compile=on")
    log = (tmp_path / "four" / "train.log").read_text()
    assert "torch.compile of sequence, query_tower, item_tower, repeats.level: the first step took" in log
    assert four["compiled"] == ["sequence", "query_tower", "item_tower", "repeats.level"]
    assert eager["compiled"] == [] and four["compile_seconds"] > 0
    a, b = losses(eager), losses(four)
    assert len(a) == len(b) == 50
    # Float noise only: fused kernels and four ranks' sums add in another order (as another thread count
    # does, README "Scaling out"); a step computed differently moves the losses by 1e-2 within a few steps.
    assert np.abs(a[:8] - b[:8]).max() < 1e-4, np.abs(a[:8] - b[:8])
    assert np.abs(a - b).max() < 1e-2, np.abs(a - b)
    assert_same_weights(final_weights(tmp_path / "eager"), final_weights(tmp_path / "four"), 5e-2, False)
