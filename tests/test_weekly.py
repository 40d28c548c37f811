"""The weekly chain (launch/weekly.py) end to end on two drops of tiny: the first week from zero, the second
warm-started on grown vocabularies, each stage whole, the chain resumable, a published week skipped, and a
running service that answers from the newest week's bundle by itself."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from test_serve import call, serve

pytestmark = pytest.mark.slow
TRAIN = "experiment=debug trainer.max_steps=8"


def weekly(chain, drop, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "launch.weekly", "--chain", str(chain), "--drop", drop, "--nproc", "1",
                           "--train-args", TRAIN, "data=tiny", f"paths.runs={chain}/runs", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_two_weeks_from_drops_to_a_served_bundle(tiny_drops, tmp_path):
    chain, out = tmp_path / "chain", tiny_drops["out"]
    weekly(chain, f"{out}/week-01")
    first = json.loads((chain / "chain.json").read_text())
    assert first["weeks"] == ["week-01"]
    one = json.loads((chain / "week-01" / "train" / "metrics.json").read_text())
    assert one["warm_start"] is None  # the first week trains from zero

    server, port = serve(chain / "serving" / "output", tmp_path / "serve", "serve.reload_poll_s=0.2")
    try:
        before = call(port, "/version")[1]
        assert before["run"].endswith("week-01/train")

        # the second week, stopped after training (as a failed job would be), then run again: it resumes
        part = weekly(chain, f"{out}/week-02", "--stages", "prepare,train")
        assert "warm start from" in part.stderr
        rest = weekly(chain, f"{out}/week-02")
        assert "[week-02] prepare: done, skipped" in rest.stderr and "[week-02] train: done, skipped" in rest.stderr
        assert "[week-02] bundle: /" in rest.stderr  # ... and ran the stages that had not
        two = json.loads((chain / "week-02" / "train" / "metrics.json").read_text())
        assert two["warm_start"]["train_dir"] == str(chain / "week-01" / "train")
        prepared = json.loads((chain / "week-02" / "prepared" / "manifest.json").read_text())
        assert prepared["parent"]["prepared"] == str(chain / "week-01" / "prepared")
        assert prepared["examples"]["rows"] < json.loads(
            (chain / "week-01" / "prepared" / "manifest.json").read_text())["examples"]["rows"]  # the window
        assert json.loads((chain / "chain.json").read_text())["weeks"] == ["week-01", "week-02"]
        evaluation = json.loads((chain / "week-02" / "evaluate" / "evaluation.json").read_text())
        assert set(evaluation["by_article_kind"]["two-tower"]) == {"never_sold", "new_28d", "older"}
        served = json.loads((chain / "serving" / "output" / "manifest.json").read_text())["index"]
        assert served["digest"] == evaluation["index"]["digest"] and served["nprobe"] == evaluation["index"]["nprobe"]

        for _ in range(300):  # the service swaps in the new week's bundle by itself
            now = call(port, "/version")[1]
            if now["run"].endswith("week-02/train"):
                break
            time.sleep(0.2)
        assert now["run"].endswith("week-02/train"), now
        assert now["customers"] > before["customers"] and now["articles"] > before["articles"]
    finally:
        server.terminate()
        server.wait(30)

    again = weekly(chain, f"{out}/week-02")
    assert "already published; nothing to do" in again.stderr


def test_a_retrain_grows_the_vocabularies_and_trains_from_zero_on_every_example(tmp_path, capsys):
    from launch.weekly import main, make_week

    parent = tmp_path / "chain" / "week-01"
    args = ["--chain", str(tmp_path / "chain"), "--drop", str(tmp_path / "week-02"), "--nproc", "1",
            "--parent", str(parent), "data=tiny"]
    for retrain in (False, True):
        main([*args, *(["--retrain"] if retrain else []), "--print-train"])
        train = capsys.readouterr().out.split()
        assert train[0] == str(tmp_path / "chain" / "week-02" / "train")
        assert (f"trainer.init_from={parent}/train" in train) is not retrain
    import argparse

    week = make_week(argparse.Namespace(chain=str(tmp_path / "chain"), drop=str(tmp_path / "week-02"), raw=None,
                                        week=None, from_zero=False, parent=str(parent), window_days=28, nproc=1,
                                        train_args="", retrain=True), ["data=tiny"])
    prepare = week.command("prepare")
    assert f"prepare.parent={parent}/prepared" in prepare and "prepare.train_days=0" in prepare
