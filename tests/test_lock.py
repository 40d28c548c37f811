"""One writer per output (data/lock.py): a second writer fails at once naming the first; a dead holder's
lock is taken over; two real data.prepare runs started together leave one whole output."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from data.lock import OutputLocked, output_lock
from data.staging import staged

ROOT = pathlib.Path(__file__).resolve().parents[1]


def hold(lock: pathlib.Path, pid: int, host: str | None = None) -> None:
    lock.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "time": time.time(),
                                "command": "data.prepare (another run)", "token": "theirs"}))


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "prepared"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        hold(tmp_path / "prepared.lock", holder.pid)
        with pytest.raises(OutputLocked, match=rf"being written by another run: pid {holder.pid} on "
                                               rf"{socket.gethostname()} .*data.prepare .*remove .*prepared.lock"):
            with staged(str(out)):
                pytest.fail("the second writer got in")
        assert json.loads((tmp_path / "prepared.lock").read_text())["pid"] == holder.pid  # left to its holder
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_on_another_host_is_not_second_guessed(tmp_path):
    hold(tmp_path / "out.lock", 1, host="some-other-node")
    with pytest.raises(OutputLocked, match="pid 1 on some-other-node"):
        with output_lock(str(tmp_path / "out")):
            pass


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    hold(tmp_path / "out.lock", gone.pid)
    with caplog.at_level(logging.WARNING):
        with staged(str(tmp_path / "out")) as tmp:
            pathlib.Path(tmp, "x").write_text("1")
            assert json.loads((tmp_path / "out.lock").read_text())["pid"] == os.getpid()
    assert f"taking over the lock of a run that is gone (pid {gone.pid}" in caplog.text
    assert (tmp_path / "out" / "x").read_text() == "1" and not (tmp_path / "out.lock").exists()


def test_the_lock_is_released_when_the_stage_fails(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with staged(str(tmp_path / "out")):
            1 / 0
    assert not (tmp_path / "out.lock").exists()
    with output_lock(str(tmp_path / "out")):  # free again
        assert (tmp_path / "out.lock").exists()


def test_object_store_urls_check_then_write_and_say_so(caplog):
    url = f"memory://lock-test-{os.getpid()}/out"
    with caplog.at_level(logging.WARNING):
        with output_lock(url):
            with pytest.raises(OutputLocked, match=f"pid {os.getpid()}"):
                with output_lock(url):
                    pass
    assert "no exclusive create" in caplog.text


# ``python -m <module>`` on a slow disk: each Parquet file takes a further 0.3 s to write, so that the
# first run still holds its output when the second reaches it, however fast the machine.
SLOW_WRITES = """
import runpy, sys, time
import pyarrow.parquet as pq
write_table = pq.write_table
def slow_write_table(*args, **kwargs):
    time.sleep(0.3)
    write_table(*args, **kwargs)
pq.write_table = slow_write_table
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def test_two_prepare_runs_on_one_output(tiny_synth, tmp_path):
    """Started together: one publishes, the other fails naming it, and the output is whole."""
    root, _ = tiny_synth
    out = tmp_path / "prepared"
    procs = [subprocess.Popen([sys.executable, "-c", SLOW_WRITES, "data.prepare", "data=tiny", f"data.root={root}",
                               f"prepare.out={out}", f"run_dir={tmp_path / f'r{i}'}"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes[0] == 0 and codes[1] != 0, [r[2][-2000:] for r in results]
    winner = next(p for p, r in zip(procs, results) if r[0] == 0)
    loser_err = next(r[2] for r in results if r[0] != 0)
    assert f"being written by another run: pid {winner.pid} on {socket.gethostname()}" in loser_err
    manifest = json.loads((out / "manifest.json").read_text())
    rows = sum(pq.ParquetFile(out / s["file"]).metadata.num_rows for s in manifest["examples"]["shards"])
    assert rows == manifest["examples"]["rows"] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("prepared.")) == []  # no lock, no staging


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch, caplog):
    """Requeued, a Slurm job keeps its id and may land on another node, where the old pid means nothing."""
    (tmp_path / "out.lock").write_text(json.dumps({"host": "node-17", "pid": 4242, "time": time.time(),
                                                   "command": "trainer.train", "slurm_job": "991"}))
    monkeypatch.setenv("SLURM_JOB_ID", "992")
    with pytest.raises(OutputLocked, match="pid 4242 on node-17"):  # another job: not ours to take
        with output_lock(str(tmp_path / "out")):
            pass
    monkeypatch.setenv("SLURM_JOB_ID", "991")
    with caplog.at_level(logging.WARNING):
        with output_lock(str(tmp_path / "out")):
            assert json.loads((tmp_path / "out.lock").read_text())["pid"] == os.getpid()
    assert "taking over the lock" in caplog.text


def test_a_second_training_run_in_one_run_directory_fails_naming_the_first(tiny_prepared, tmp_path):
    prepared, _ = tiny_prepared
    run_dir = tmp_path / "train"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        hold(tmp_path / "train.lock", holder.pid)
        proc = subprocess.run([sys.executable, "-m", "trainer.train", "experiment=debug", f"prepare.out={prepared}",
                               f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert f"being written by another run: pid {holder.pid} on {socket.gethostname()}" in proc.stderr
    assert not (run_dir / "checkpoints").exists()  # it wrote nothing
