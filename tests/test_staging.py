"""Stage outputs appear whole or not at all: each writing stage is killed (SIGKILL) part-way through a
re-run, and the next stage must read the previous complete output, never a mixture."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import C1, prepare_options, train_in_process, write_hm_fixture
from omegaconf import OmegaConf

from data.config import DataConfig, SplitConfig
from data.prepare import prepare
from data.staging import output_of, staged

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs ``python -m <module> <overrides>`` and SIGKILLs it right after its Nth Parquet file is written.
KILL_AFTER_WRITES = """
import os, runpy, signal, sys
import pyarrow.parquet as pq
limit, written, write_table = int(os.environ["KILL_AFTER_WRITES"]), [0], pq.write_table
def killing_write_table(*args, **kwargs):
    write_table(*args, **kwargs)
    written[0] += 1
    if written[0] == limit:
        os.kill(os.getpid(), signal.SIGKILL)
pq.write_table = killing_write_table
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_stage(module: str, *overrides: str, kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_AFTER_WRITES": str(kill_after or 0)}
    cmd = [sys.executable, "-c", KILL_AFTER_WRITES, module, *overrides] if kill_after else \
        [sys.executable, "-m", module, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if kill_after:
        assert proc.returncode == -signal.SIGKILL, f"{module} was not killed mid-write:\n{proc.stderr[-3000:]}"
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def snapshot(directory: pathlib.Path) -> dict[str, str]:
    """Every file under ``directory`` with its content hash."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(directory.name + "."))


# ---------------------------------------------------------------- the helper itself


def test_staged_publishes_whole_and_an_exception_publishes_nothing(tmp_path):
    out = tmp_path / "out"
    with staged(str(out), "mark") as tmp:
        (pathlib.Path(tmp) / "a").write_text("1")
        (pathlib.Path(tmp) / "mark").write_text("done")
    assert snapshot(out).keys() == {"a", "mark"}
    with pytest.raises(ValueError, match="boom"):
        with staged(str(out), "mark") as tmp:
            (pathlib.Path(tmp) / "b").write_text("2")
            raise ValueError("boom")
    assert snapshot(out).keys() == {"a", "mark"} and leftovers(out) == []
    with pytest.raises(RuntimeError, match="wrote no mark; its output is not published"):
        with staged(str(out), "mark") as tmp:
            (pathlib.Path(tmp) / "c").write_text("3")
    assert snapshot(out).keys() == {"a", "mark"} and leftovers(out) == []
    with staged(str(out), "mark") as tmp:  # a new output replaces the old one whole: no "a" left behind
        (pathlib.Path(tmp) / "mark").write_text("second")
    assert snapshot(out).keys() == {"mark"} and (out / "mark").read_text() == "second"


def test_leftovers_of_a_killed_run_are_tidied(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "out.staging-1-dead").mkdir()  # killed while writing
    (tmp_path / "out.old-2-dead").mkdir()  # killed between putting the old output aside and the new in place
    (tmp_path / "out.old-2-dead" / "mark").write_text("previous")
    with staged(str(out), "mark") as tmp:
        assert leftovers(out) == sorted([pathlib.Path(tmp).name, "out.lock"])  # held while writing
        assert (out / "mark").read_text() == "previous"  # restored before anything else
        (pathlib.Path(tmp) / "mark").write_text("new")
    assert leftovers(out) == [] and (out / "mark").read_text() == "new"


# ---------------------------------------------------------------- each stage killed mid-write


def ingest_overrides(raw: pathlib.Path, root: pathlib.Path, run_dir: pathlib.Path) -> list[str]:
    return ["data=tiny", "data.source=hm", f"data.raw_dir={raw}", f"data.root={root}", f"run_dir={run_dir}",
            "ingest.shard_rows=2"]


def test_killed_ingest_leaves_the_previous_dataset_for_prepare(tmp_path):
    raw1, raw2, root = tmp_path / "raw1", tmp_path / "raw2", tmp_path / "dataset"
    write_hm_fixture(raw1)
    write_hm_fixture(raw2)
    tx = raw2 / "transactions_train.csv"  # the second delivery has more rows
    tx.write_bytes(tx.read_bytes() + "".join(f"2018-09-24,{C1},0108775015,0.01,1\n" for _ in range(6)).encode())
    run_stage("data.ingest", *ingest_overrides(raw1, root, tmp_path / "r1"))
    before = snapshot(root)
    run_stage("data.ingest", *ingest_overrides(raw2, root, tmp_path / "r2"), kill_after=3)
    assert snapshot(root) == before
    assert [p for p in leftovers(root) if ".staging-" in p], "the killed run wrote nothing aside"
    report = json.loads((root / "ingest_report.json").read_text())
    m = prepare(OmegaConf.structured(DataConfig(name="t", root=str(root))), OmegaConf.structured(SplitConfig(val_days=1)),
                prepare_options(str(tmp_path / "prepared")), progress=False)
    assert m["transactions"]["rows_read"] == report["tables"]["transactions"]["rows_written"] == 4
    run_stage("data.ingest", *ingest_overrides(raw2, root, tmp_path / "r3"))  # a clean re-run tidies up
    assert leftovers(root) == []
    assert json.loads((root / "ingest_report.json").read_text())["tables"]["transactions"]["rows_written"] == 10


def test_killed_prepare_leaves_the_previous_prepared_data(tiny_synth, tmp_path):
    root, _ = tiny_synth
    out = tmp_path / "prepared"
    common = ["data=tiny", f"data.root={root}", f"prepare.out={out}"]
    run_stage("data.prepare", *common, "split.test_days=7", f"run_dir={tmp_path / 'r1'}")
    before = snapshot(out)
    assert "eval/test.parquet" in before
    run_stage("data.prepare", *common, "prepare.history_len=3", "prepare.shard_rows=2000",
              f"run_dir={tmp_path / 'r2'}", kill_after=12)
    assert snapshot(out) == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["history_len"] == 20
    shard_rows = sum(pq.ParquetFile(out / s["file"]).metadata.num_rows for s in manifest["examples"]["shards"])
    assert shard_rows == manifest["examples"]["rows"]
    # An output without a test period does not keep the old one's eval/test.parquet.
    run_stage("data.prepare", *common, "split.test_days=0", f"run_dir={tmp_path / 'r3'}")
    assert (out / "eval" / "val.parquet").exists() and not (out / "eval" / "test.parquet").exists()
    assert leftovers(out) == []


def test_killed_export_and_index_leave_the_previous_outputs(tiny_prepared, tmp_path):
    prepared, _ = tiny_prepared
    train_in_process(prepared, tmp_path / "train", "trainer.max_steps=6")
    export, index = tmp_path / "export", tmp_path / "index"
    exporting = ["trainer.export", f"train_dir={tmp_path / 'train'}", f"hydra.run.dir={export}"]
    indexing = ["trainer.index", f"export_dir={export}", f"hydra.run.dir={index}"]
    run_stage(*exporting)
    run_stage(*indexing, "index.nlist=4")
    exported, indexed = snapshot(pathlib.Path(output_of(str(export)))), snapshot(pathlib.Path(output_of(str(index))))

    run_stage(*exporting, kill_after=1)
    assert snapshot(pathlib.Path(output_of(str(export)))) == exported
    run_stage(*indexing, "index.nlist=8", kill_after=1)
    assert snapshot(pathlib.Path(output_of(str(index)))) == indexed
    assert json.loads(pathlib.Path(output_of(str(index)), "index_report.json").read_text())["nlist"] == 4
    # The next stage reads the complete earlier outputs.
    run_stage("trainer.evaluate", f"export_dir={export}", f"index_dir={index}", f"prepare.out={prepared}",
              f"hydra.run.dir={tmp_path / 'eval'}")
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert "IVF" in json.dumps(report)


def test_staged_on_an_fsspec_url():
    """Object stores have no atomic directory rename: there the commit mark written last is what a
    reader trusts; the publish itself must still leave exactly the new output."""
    import fsspec

    from data.io import read_json, write_json

    fs = fsspec.filesystem("memory")
    for version in (1, 2):
        with staged("memory://staging-test/out", "manifest.json") as tmp:
            assert tmp.startswith("memory://")
            write_json({"v": version}, f"{tmp}/part.json")
            write_json({"v": version}, f"{tmp}/manifest.json")
    assert read_json("memory://staging-test/out/manifest.json") == {"v": 2}
    assert fs.ls("/staging-test", detail=False) == ["/staging-test/out"]
    fs.rm("/staging-test", recursive=True)


def test_a_file_written_atomically_is_whole_or_absent(tmp_path):
    from data.io import atomic_open, write_json

    write_json({"v": 1}, str(tmp_path / "r.json"))
    with pytest.raises(RuntimeError):
        with atomic_open(str(tmp_path / "r.json"), "w") as f:
            f.write('{"v": 2, "half')
            raise RuntimeError("killed")
    assert json.loads((tmp_path / "r.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
