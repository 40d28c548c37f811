"""The README's main-job command, end to end on the tiny preset, in a temporary folder."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_run_sh_runs_every_stage(tmp_path):
    env = {**os.environ, "DATA": "tiny"}
    proc = subprocess.run(["bash", str(ROOT / "launch" / "run.sh"), f"paths.datasets={tmp_path}/datasets",
                           f"paths.runs={tmp_path}/runs"],
                          cwd=ROOT, env={**env, "NPROC": "2", "TRAIN_ARGS": "trainer.epochs=1 trainer.progress=false"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "datasets" / "tiny" / "prepared" / "manifest.json").read_text())
    assert manifest["examples"]["rows"] > 40_000 and manifest["eval"]["val"]["customers"] > 100
    for stage in ("synth", "prepare", "train", "export", "index", "evaluate", "bundle"):
        assert (tmp_path / "runs" / "tiny" / stage / "config.yaml").exists(), stage
    bundle = json.loads((tmp_path / "runs" / "tiny" / "bundle" / "output" / "manifest.json").read_text())
    assert bundle["int8"] and set(bundle["files"]) == {"query_tower.pt2", "customers.parquet", "items.parquet",
                                                       "index.faiss", "item_tower.pt2", "article_vocab.parquet"}
    evaluation = json.loads((tmp_path / "runs" / "tiny" / "evaluate" / "evaluation.json").read_text())
    assert bundle["index"]["digest"] == evaluation["index"]["digest"]  # served what evaluate measured
    assert f"{sys.executable} -m trainer.serve data=tiny serve.bundle=" in proc.stdout
    assert "curl -s localhost:8000" in proc.stdout
    table = (tmp_path / "runs" / "tiny" / "evaluate" / "evaluation.md").read_text()
    assert "| two-tower |" in table and "| repurchase + popularity |" in table
    assert "| two-tower |" in proc.stdout  # the table is printed at the end

    # A quiet console: the stages' own lines, a compact sharding plan and the results; the libraries'
    # chatter (TorchRec's planner, Python warnings) only in the run's log file.
    console = [line for line in (proc.stdout + proc.stderr).replace("\r", "\n").splitlines()
               if line.strip() and not re.search(r"\d+%\||it/s\]|/s\]$", line)]
    assert len(console) <= 60, "\n".join(console)
    assert "sharding plan over 2 rank(s)" in proc.stdout
    assert not any("GreedyPerfPartitioner" in line or "Warning" in line for line in console), "\n".join(console)
    train_log = (tmp_path / "runs" / "tiny" / "train" / "train.log").read_text()
    assert "GreedyPerfPartitioner" in train_log and "FutureWarning" in train_log

    # The pictures, shown in the report.
    evaluate = tmp_path / "runs" / "tiny" / "evaluate"
    for picture in ("recall_at_k.png", "nprobe.png", "training.png"):
        assert f"]({picture})" in table and (evaluate / picture).stat().st_size > 10_000, picture
    from trainer.evaluation.plots import series_of

    assert {"two-tower", "popularity (last week)", "item-kNN"} <= set(series_of(str(evaluate / "recall_at_k.png")))
    trained = series_of(str(evaluate / "training.png"))
    assert len(trained["in_batch_loss"]) == len(trained["step"]) >= 1 and len(trained["epoch"]) == 1
    assert (tmp_path / "runs" / "tiny" / "train" / "training.png").exists()
    assert (tmp_path / "runs" / "tiny" / "index" / "nprobe.png").exists()


def test_torchrun_wrapper_derives_run_dir_and_resumes(tiny_prepared, tmp_path):
    prepared, _ = tiny_prepared
    env = {**os.environ, "NPROC": "2"}
    args = ["bash", str(ROOT / "launch" / "torchrun.sh"), f"prepare.out={prepared}", f"paths.runs={tmp_path}",
            "trainer.max_steps=10", "trainer.validate=false", "trainer.progress=false", "trainer.global_batch_size=512"]
    first = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dirs = list((tmp_path / "small").iterdir())
    assert len(run_dirs) == 1 and "trainer.max_steps-10" in run_dirs[0].name
    assert json.loads((run_dirs[0] / "metrics.json").read_text())["step"] == 10
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "resumed from" in (run_dirs[0] / "train.log").read_text()


def test_the_train_entry_pickles_as_a_submitit_sweep_does():
    """Run as ``python -m trainer.train -m hydra/launcher=slurm``, the module is __main__ and submitit
    pickles its task function by value, with every global it uses: none may be unpicklable (such as
    torch.backends.cudnn)."""
    import types

    import cloudpickle

    src = (ROOT / "trainer" / "train.py").read_text().replace('if __name__ == "__main__":\n    main()', "")
    module = types.ModuleType("as_main")
    exec(compile(src, str(ROOT / "trainer" / "train.py"), "exec"), module.__dict__)
    assert len(cloudpickle.dumps(module.main)) > 0
