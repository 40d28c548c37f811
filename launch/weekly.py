"""The weekly chain: a new drop of transactions, customers and articles to a published serving bundle.

    python -m launch.weekly --chain runs/weekly --drop datasets/small-drops/week-03 data=small
    python -m launch.weekly --chain runs/weekly --raw /data/hm-2020-09-22 data=hm --week 2020-09-22
    python -m launch.weekly --chain runs/weekly --drop ... --stages export,index   # some stages only

A chain is a directory: one folder per week, each stage's output inside it, and ``serving/`` (the bundle
the service watches: ``python -m trainer.serve serve.bundle=<chain>/serving/output``). Week by week:

    ingest    (with --raw) the week's CSVs -> canonical tables in <week>/data
    prepare   vocabularies grown from the last published week's (prepare.parent): every id keeps its
              row; the first week builds them afresh. Training examples of the last --window-days only
              after the first week (histories still see everything)
    train     torchrun; warm-started from the last published week's run (trainer.init_from, at
              trainer.init_lr_scale of the rates), validated on the drop's last week and early-stopped as
              any run; the first week trains from zero (and every week with --retrain, on all examples)
    export, index, evaluate (against the baselines, Recall@12 by kind of article), bundle
    publish   the bundle copied whole into <chain>/serving (the service swaps it in by itself) and the
              week appended to <chain>/chain.json

Each stage publishes its output whole (data/staging.py) and is skipped when its output is there, so the
chain is resumable: run the same command again after a failure and it continues at the stage that did
not finish (training resumes from its own checkpoints). A week already published is skipped whole.
Extra arguments are Hydra overrides every stage accepts (data=..., paths.*); ``--train-args`` adds
overrides for training only. Under Slurm, ``slurm/submit_weekly.sh`` runs the same stages as three
dependent jobs (data, multi-node training through slurm/train.sbatch, the rest). No shell: every stage is
an argument list.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger("weekly")
STAGES = ("ingest", "prepare", "train", "export", "index", "evaluate", "bundle", "publish")
CHAIN_FILE = "chain.json"


@dataclass
class Week:
    chain: str
    name: str
    drop: str | None  # canonical tables of the week (None with --raw: ingested into <week>/data)
    raw: str | None
    parent: str | None  # the last published week's folder, or None for the first
    window_days: int
    nproc: int
    overrides: list[str] = field(default_factory=list)
    train_args: list[str] = field(default_factory=list)
    warm: bool = True  # with a parent: warm-start from its run (False: grow the vocabularies, train from zero)

    @property
    def dir(self) -> str:
        return os.path.join(self.chain, self.name)

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    @property
    def data_root(self) -> str:
        return self.drop if self.drop else self.path("data")

    # ------------------------------------------------------------ what marks each stage done

    def done(self, stage: str) -> bool:
        marks = {
            "ingest": self.path("data", "manifest.json") if self.raw else None,
            "prepare": self.path("prepared", "manifest.json"),
            "train": self.path("train", "metrics.json"),
            "export": self.path("export", "output", "export_report.json"),
            "index": self.path("index", "output", "index_report.json"),
            "evaluate": self.path("evaluate", "evaluation.json"),
            "bundle": self.path("bundle", "output", "manifest.json"),
        }
        if stage == "publish":
            return self.name in published(self.chain)
        mark = marks[stage]
        if mark is None:  # nothing to do (a canonical drop needs no ingest)
            return True
        if stage == "train" and os.path.exists(self.path("train", "PREEMPTED")):
            return False
        return os.path.exists(mark)

    # ------------------------------------------------------------ the stages' commands

    def command(self, stage: str) -> list[str]:
        py = sys.executable
        common = [*self.overrides, f"data.root={self.data_root}"]
        prepared = f"prepare.out={self.path('prepared')}"
        if stage == "ingest":
            return [py, "-m", "data.ingest", *common, f"data.raw_dir={self.raw}", f"hydra.run.dir={self.path('ingest')}"]
        if stage == "prepare":
            grow = [f"prepare.parent={os.path.join(self.parent, 'prepared')}",
                    f"prepare.train_days={self.window_days if self.warm else 0}"] if self.parent else []
            return [py, "-m", "data.prepare", *common, prepared, *grow, f"hydra.run.dir={self.path('prepare')}"]
        if stage == "train":
            return [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}",
                    "-m", "trainer.train", *self.train_overrides(), f"hydra.run.dir={self.path('train')}"]
        if stage == "export":
            return [py, "-m", "trainer.export", *common, f"train_dir={self.path('train')}",
                    f"hydra.run.dir={self.path('export')}"]
        if stage == "index":
            return [py, "-m", "trainer.index", *common, f"export_dir={self.path('export')}",
                    f"hydra.run.dir={self.path('index')}"]
        if stage == "evaluate":
            return [py, "-m", "trainer.evaluate", *common, prepared, f"export_dir={self.path('export')}",
                    f"index_dir={self.path('index')}", f"hydra.run.dir={self.path('evaluate')}"]
        if stage == "bundle":
            return [py, "-m", "trainer.bundle", *common, f"train_dir={self.path('train')}",
                    f"index_dir={self.path('index')}", f"hydra.run.dir={self.path('bundle')}"]
        raise ValueError(stage)


    def train_overrides(self) -> list[str]:
        """trainer.train's overrides (the run directory aside): also what slurm/train.sbatch gets."""
        warm = [f"trainer.init_from={os.path.join(self.parent, 'train')}"] if self.parent and self.warm else []
        return [*self.overrides, f"data.root={self.data_root}", f"prepare.out={self.path('prepared')}",
                "trainer.progress=false", *warm, *self.train_args]


def published(chain: str) -> list[str]:
    """The weeks published so far, oldest first."""
    try:
        with open(os.path.join(chain, CHAIN_FILE)) as f:
            return list(json.load(f)["weeks"])
    except FileNotFoundError:
        return []


def publish(week: Week) -> None:
    """The week's bundle copied whole into <chain>/serving/output (data/staging.py: a reader sees the old
    bundle or the new one), then the week recorded in chain.json (written aside, renamed)."""
    from data.staging import staged

    with staged(os.path.join(week.chain, "serving", "output"), "manifest.json") as tmp:
        src = week.path("bundle", "output")
        for name in sorted(os.listdir(src)):
            if name != "manifest.json":
                shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
        shutil.copy2(os.path.join(src, "manifest.json"), os.path.join(tmp, "manifest.json"))  # the mark, last
    weeks = [w for w in published(week.chain) if w != week.name] + [week.name]
    evaluation = json.load(open(week.path("evaluate", "evaluation.json")))
    record = {"weeks": weeks, "serving": os.path.join(week.chain, "serving", "output"),
              "latest": {"week": week.name, "parent": week.parent, "published": time.time(),
                         "evaluation": {k: v for k, v in evaluation.items() if k in ("full_catalogue", "by_article_kind")}}}
    tmp = os.path.join(week.chain, CHAIN_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(week.chain, CHAIN_FILE))


def run_week(week: Week, stages: tuple[str, ...] = STAGES) -> dict:
    """Runs the week's stages that are not done yet, in order; returns {stage: "ran" | "done"}. The seconds
    each stage took are kept in <week>/stages.json."""
    os.makedirs(week.dir, exist_ok=True)
    out = {}
    timings_file = week.path("stages.json")
    timings = json.load(open(timings_file)) if os.path.exists(timings_file) else {}
    for stage in stages:
        if week.done(stage):
            log.info("[%s] %s: done, skipped", week.name, stage)
            out[stage] = "done"
            continue
        t0 = time.perf_counter()
        if stage == "publish":
            publish(week)
        else:
            cmd = week.command(stage)
            log.info("[%s] %s: %s", week.name, stage, " ".join(cmd))
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if stage == "train" \
                else os.environ
            proc = subprocess.run(cmd, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"[{week.name}] {stage} failed (exit {proc.returncode}); run the same command again "
                                 "to resume at this stage")
        out[stage] = "ran"
        timings[stage] = round(time.perf_counter() - t0, 2)
        with open(timings_file + ".tmp", "w") as f:
            json.dump(timings, f, indent=1)
        os.replace(timings_file + ".tmp", timings_file)
        log.info("[%s] %s: %.1fs", week.name, stage, timings[stage])
    return out


def make_week(args, overrides: list[str]) -> Week:
    name = args.week or os.path.basename(os.path.normpath(args.drop or args.raw))
    weeks = published(args.chain)
    earlier = weeks[:weeks.index(name)] if name in weeks else weeks  # the weeks published before this one
    parent = os.path.join(args.chain, earlier[-1]) if earlier else None
    parent = None if args.from_zero else args.parent or parent
    return Week(args.chain, name, args.drop, args.raw, parent, args.window_days, args.nproc, overrides,
                list(args.train_args.split()) if args.train_args else [], warm=not args.retrain)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--chain", required=True, help="the chain's directory (one folder per week)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--drop", help="the week's canonical tables (data.synth, data.drops or data.ingest output)")
    src.add_argument("--raw", help="the week's raw files, ingested first (with data=hm or data=movielens)")
    p.add_argument("--week", help="the week's name (default: the drop's folder name)")
    p.add_argument("--window-days", type=int, default=28, help="a warm start's training examples: the last N days")
    p.add_argument("--nproc", type=int, default=int(os.environ.get("NPROC", "0")) or None,
                   help="training processes (default: one per GPU, else 2)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"which stages (comma-separated, of {','.join(STAGES)})")
    p.add_argument("--from-zero", action="store_true", help="no warm start: vocabularies afresh, training from zero")
    p.add_argument("--retrain", action="store_true",
                   help="vocabularies grown from the parent (what is new stays known) but training from zero on "
                        "every example: a periodic full retrain inside the chain")
    p.add_argument("--parent", help="the week folder to grow from and warm-start from (default: the last published)")
    p.add_argument("--train-args", default="", help="Hydra overrides for training only")
    p.add_argument("--print-train", action="store_true",
                   help="print the week's training run directory, then its overrides, a line each, and exit "
                        "(slurm/submit_weekly.sh hands them to slurm/train.sbatch)")
    args, overrides = p.parse_known_args(argv)
    if args.nproc is None:
        import torch

        args.nproc = torch.cuda.device_count() or 2
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; the stages are {', '.join(STAGES)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    week = make_week(args, overrides)
    if args.print_train:
        print("\n".join([week.path("train"), *week.train_overrides()]))
        return {}
    if week.name in published(args.chain) and set(stages) == set(STAGES):
        log.info("[%s] already published; nothing to do", week.name)
        return {s: "done" for s in stages}
    log.info("[%s] %s", week.name, f"warm start from {week.parent}" if week.parent and week.warm else
             f"from zero on vocabularies grown from {week.parent}" if week.parent else "from zero")
    return run_week(week, stages)


if __name__ == "__main__":
    main()
