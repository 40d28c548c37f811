"""Checkpoints that know their run: the manager's guarantees, and the trainer's resume edge cases
(run in this process, one rank, the shared debug preset)."""

from __future__ import annotations

import inspect
import json
import os
import random

import numpy as np
import pytest
import torch
from conftest import compose_train, train_in_process
from omegaconf import OmegaConf

import trainer.loop.checkpoint as ckpt
from trainer.loop.checkpoint import CheckpointError, CheckpointManager, complete_checkpoints, latest
from trainer.loop.state import ModelState, RngState, TrainState

FP = {"model.id_dim": 64, "data.digest": "abc"}


def manager(folder, fp=None, keep=3, seed=0):
    torch.manual_seed(seed)
    state, model = TrainState(), torch.nn.Linear(4, 3)
    parts = {"train": state, "model": ModelState(model), "rng": RngState(torch.device("cpu"))}
    return CheckpointManager(str(folder), parts, fp or FP, keep=keep), state, model


def test_save_load_round_trip_and_rng_restored(tmp_path):
    m, state, model = manager(tmp_path)
    m.prepare(resume=True)
    state.step, state.epoch, state.history = 7, 1, {"val": [{"recall@12": 0.5}], "train": []}
    random.seed(3)
    np.random.seed(4)
    m.save(7)
    expect = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    m2, state2, model2 = manager(tmp_path, seed=1)
    assert not torch.equal(model.weight, model2.weight)
    random.seed(99)
    np.random.seed(99)
    loaded = m2.load()
    assert loaded.step == 7 and (state2.step, state2.epoch) == (7, 1)
    assert state2.history["val"] == [{"recall@12": 0.5}]
    assert torch.equal(model.weight, model2.weight)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expect  # every RNG restored


def test_resaving_a_complete_step_is_a_no_op(tmp_path):
    m, state, _ = manager(tmp_path)
    m.prepare(resume=True)
    path = m.save(5)
    stamp = os.stat(os.path.join(path, ckpt.RUN_FILE)).st_mtime_ns
    assert m.save(5) is None
    assert os.stat(os.path.join(path, ckpt.RUN_FILE)).st_mtime_ns == stamp


def test_a_save_killed_midway_leaves_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    m, state, _ = manager(tmp_path)
    m.prepare(resume=True)
    m.save(10)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt.dcp, "save", killed)
    for step in (10, 20):  # re-saving the complete step, and a new step
        try:
            m.save(step)
        except KeyboardInterrupt:
            pass
    monkeypatch.undo()
    assert [f.step for f in complete_checkpoints(str(tmp_path))] == [10]
    assert any(name.endswith(".partial") for name in os.listdir(tmp_path))
    m2, state2, _ = manager(tmp_path)
    m2.prepare(resume=True)  # the next start removes the leftover
    assert not any(name.endswith(".partial") for name in os.listdir(tmp_path))
    assert m2.load().step == 10


def test_keep_last_counts_complete_checkpoints_in_completion_order(tmp_path):
    m, state, _ = manager(tmp_path, keep=2)
    m.prepare(resume=True)
    for step in (50, 20, 30):
        m.save(step)
    assert [f.step for f in complete_checkpoints(str(tmp_path))] == [20, 30]
    assert latest(str(tmp_path)).step == 30


def test_another_fingerprint_is_an_error_naming_the_keys(tmp_path):
    m, _, _ = manager(tmp_path)
    m.prepare(resume=True)
    m.save(3)
    other, _, _ = manager(tmp_path, fp={**FP, "model.id_dim": 32})
    with pytest.raises(CheckpointError, match=r"model.id_dim: 64 \(checkpoint\) vs 32 \(now\)"):
        other.load()


def test_a_shape_mismatch_is_an_error_not_a_skip(tmp_path):
    m, _, _ = manager(tmp_path)
    m.prepare(resume=True)
    m.save(3)
    wide = CheckpointManager(str(tmp_path), {"model": ModelState(torch.nn.Linear(4, 5))}, FP)
    with pytest.raises(CheckpointError, match=r"model.weight: \(3, 4\) in the checkpoint, \(5, 4\) now"):
        wide.load()


def test_resume_false_never_mixes_with_an_earlier_run(tmp_path):
    m, _, _ = manager(tmp_path)
    m.prepare(resume=True)
    m.save(500)
    fresh, _, _ = manager(tmp_path)
    fresh.prepare(resume=False)
    assert complete_checkpoints(str(tmp_path)) == []


# ---------------------------------------------------------------- the trainer, in this process


def test_second_run_with_resume_false_is_the_one_exported(tiny_prepared, tmp_path):
    """Train twice in one run directory, the second run shorter and with trainer.resume=false: export
    loads the second run's final step, never the first run's newer-numbered checkpoints."""
    from trainer.export import export

    prepared, _ = tiny_prepared
    run_dir = tmp_path / "train"
    train_in_process(prepared, run_dir, "trainer.max_steps=30", "trainer.checkpoint_every=10",
                     "trainer.validate=false")
    second = train_in_process(prepared, run_dir, "trainer.max_steps=12", "trainer.resume=false",
                              "model.id_dim=32", "trainer.validate=false")
    assert second["step"] == 12
    written = export(OmegaConf.create({"train_dir": str(run_dir), "checkpoint": "latest"}), str(tmp_path / "export"))
    from trainer.parallel import distributed as D
    D.shutdown()
    assert written["step"] == 12 and written["checkpoint"].endswith("step-00000012")
    report = json.loads((tmp_path / "export" / "output" / "export_report.json").read_text())
    assert report["fingerprint"] == written["fingerprint"]


def test_resume_with_another_model_fails_naming_the_key(tiny_prepared, tmp_path):
    prepared, _ = tiny_prepared
    train_in_process(prepared, tmp_path, "trainer.max_steps=5", "trainer.validate=false")
    with pytest.raises(CheckpointError, match="model.id_dim: 64 .checkpoint. vs 32 .now."):
        train_in_process(prepared, tmp_path, "trainer.max_steps=8", "model.id_dim=32", "trainer.validate=false")


def stop_when(condition):
    """Makes the trainer's stop signal fire when ``condition(trainer)`` holds (as a SIGTERM would)."""
    def install(trainer):
        trainer.stop.requested = lambda: condition(trainer)
    return install


def test_a_stop_at_an_epochs_last_step_resumes_at_the_next_epoch(tiny_prepared, tmp_path):
    prepared, _ = tiny_prepared
    cfg = compose_train(prepared, tmp_path)
    from data.stream import ExampleStream
    stream = ExampleStream(prepared, cfg.trainer.global_batch_size)
    first, second = stream.batches_per_epoch(0), stream.batches_per_epoch(1)
    common = ["trainer.epochs=2", "trainer.validate=false"]
    out = train_in_process(prepared, tmp_path, *common, before_fit=stop_when(lambda t: t.state.step == first))
    assert out["preempted_at"] == first
    assert (tmp_path / "PREEMPTED").read_text().strip() == str(first)
    done = train_in_process(prepared, tmp_path, *common)
    assert (done["step"], done["epoch"]) == (first + second, 2)  # no epoch replayed
    assert not (tmp_path / "PREEMPTED").exists()


def test_a_stop_during_validation_is_honoured_and_validation_runs_on_resume(tiny_prepared, tmp_path):
    prepared, _ = tiny_prepared

    def in_validation(_trainer):
        return any(f.function == "validate" and f.filename.endswith("validation.py") for f in inspect.stack())

    from data.stream import ExampleStream
    stream = ExampleStream(prepared, 512)
    out = train_in_process(prepared, tmp_path, "trainer.epochs=2", before_fit=stop_when(in_validation))
    assert out["val"] == [] and out["preempted_at"] == stream.batches_per_epoch(0)  # inside the first validation
    done = train_in_process(prepared, tmp_path, "trainer.epochs=2")
    assert [v["epoch"] for v in done["val"]] == [1, 2]  # the interrupted validation ran first
    assert done["step"] == stream.batches_per_epoch(0) + stream.batches_per_epoch(1)


def test_a_nan_stops_the_run_and_the_last_good_checkpoint_stays_newest(tiny_prepared, tmp_path):
    from trainer.loop.stops import NonFiniteLoss

    prepared, _ = tiny_prepared
    train_in_process(prepared, tmp_path, "trainer.max_steps=20", "trainer.validate=false")
    before = latest(str(tmp_path / "checkpoints"))
    assert before.step == 20
    with pytest.raises(NonFiniteLoss, match="not finite at step 21"):
        train_in_process(prepared, tmp_path, "trainer.max_steps=40", "trainer.checkpoint_every=5",
                         "trainer.validate=false", "loss.temperature=1e-40")  # logits overflow: NaN
    after = latest(str(tmp_path / "checkpoints"))
    assert (after.path, after.step) == (before.path, 20)


def test_a_setting_added_later_at_its_default_is_not_a_difference():
    from trainer.loop.fingerprint import differences

    old = {"model.id_dim": 64}  # written before model.history_encoder existed
    assert differences(old, {"model.id_dim": 64, "model.history_encoder": "bag"}) == []
    assert differences(old, {"model.id_dim": 64, "model.history_encoder": "transformer"}) == [
        "model.history_encoder: '<absent>' (checkpoint) vs 'transformer' (now)"]
    # buying again was the bonus before model.repeat_mode existed: today's default (mixture) differs
    assert differences(old, {"model.id_dim": 64, "model.repeat_mode": "bonus"}) == []
    assert differences(old, {"model.id_dim": 64, "model.repeat_mode": "mixture"}) == [
        "model.repeat_mode: '<absent>' (checkpoint) vs 'mixture' (now)"]


def distcp_file(path) -> str:
    return next(os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".distcp"))


@pytest.mark.parametrize("how", ["truncated", "same size, other bytes"])
def test_an_unreadable_checkpoint_is_moved_aside_and_saved_again(tmp_path, how):
    m, state, model = manager(tmp_path)
    m.prepare(resume=True)
    for step in (10, 20):
        state.step = step
        m.save(step)
    damaged = distcp_file(os.path.join(tmp_path, "step-00000020"))
    data = open(damaged, "rb").read()
    with open(damaged, "wb") as f:  # a same-size change passes the size check and fails the checksum
        f.write(data[: len(data) // 2] if how == "truncated" else bytes(b ^ 0xFF for b in data))
    m2, state2, _ = manager(tmp_path)
    m2.prepare(resume=True)
    assert m2.load().step == 10  # the older one
    names = os.listdir(tmp_path)
    assert "step-00000020" not in names and any(n.startswith("step-00000020.unreadable-") for n in names)
    assert [f.step for f in complete_checkpoints(str(tmp_path))] == [10]  # no longer counted
    state2.step = 20
    assert m2.save(20) is not None  # training passes step 20 again: saved anew, readable
    m3, state3, _ = manager(tmp_path)
    assert m3.load().step == 20 and state3.step == 20


def test_a_damaged_checkpoint_does_not_count_for_keep_last(tmp_path):
    m, state, _ = manager(tmp_path, keep=2)
    m.prepare(resume=True)
    for step in (10, 20):
        m.save(step)
    os.remove(distcp_file(os.path.join(tmp_path, "step-00000020")))
    m2, _, _ = manager(tmp_path, keep=2)
    m2.prepare(resume=True)  # found at the start: set aside
    assert [f.step for f in complete_checkpoints(str(tmp_path))] == [10]
    m2.save(30)
    assert [f.step for f in complete_checkpoints(str(tmp_path))] == [10, 30]  # 10 not rotated out by it


def test_run_json_records_every_files_size_and_checksum(tmp_path):
    import hashlib

    m, _, _ = manager(tmp_path)
    m.prepare(resume=True)
    path = m.save(4)
    recorded = latest(str(tmp_path)).info["files"]
    on_disk = sorted(n for n in os.listdir(path) if n != ckpt.RUN_FILE)
    assert sorted(recorded) == on_disk and ".metadata" in on_disk
    for name in on_disk:
        data = open(os.path.join(path, name), "rb").read()
        assert recorded[name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_checkpoint_from_before_a_rename_loads_under_the_new_names(tmp_path):
    """Parameters renamed in the code (TwoTower's ``sales_bias`` -> ``sales.bias``) still load from a
    checkpoint saved under the old names; without the renames the missing key is an error naming it."""
    from trainer.model.towers import RENAMED

    class Old(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sales_bias = torch.nn.Parameter(torch.arange(4.0))
            self.repeat_level = torch.nn.Linear(3, 1)

    class New(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sales = torch.nn.Module()
            self.sales.bias = torch.nn.Parameter(torch.zeros(4))
            self.repeats = torch.nn.Module()
            self.repeats.level = torch.nn.Linear(3, 1)

    old = Old()
    saved = CheckpointManager(str(tmp_path), {"model": ModelState(old)}, FP)
    saved.prepare(resume=True)
    saved.save(4)
    new = New()
    assert not torch.equal(new.sales.bias, old.sales_bias)
    loaded = CheckpointManager(str(tmp_path), {"model": ModelState(new)}, FP, renamed=RENAMED).load()
    assert loaded.step == 4
    assert torch.equal(new.sales.bias, old.sales_bias)
    assert torch.equal(new.repeats.level.weight, old.repeat_level.weight)
    assert set(new.state_dict()) == {"sales.bias", "repeats.level.weight", "repeats.level.bias"}
    with pytest.raises(CheckpointError, match="sales.bias: missing in the checkpoint"):
        CheckpointManager(str(tmp_path), {"model": ModelState(New())}, FP).load()
