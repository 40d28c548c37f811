"""Week after week: a warm start on grown vocabularies against a full retrain from zero, week by week.

    .venv/bin/python bench/weekly.py --data small --weeks 4                 # the README's figures
    .venv/bin/python bench/weekly.py --data tiny --weeks 2 --full-args "trainer.max_steps=20"   # a smoke run
    .venv/bin/python bench/weekly.py --data small --weeks 4 --warm-args "model.ids=..."   # another arm

The synthetic dataset's last ``weeks + 1`` weeks become drops (data/drops.py): drop k holds what was known
before the end of its week, whose last 7 days are its validation week ("the following week" of the
model trained on the days before it). Both arms train the first drop from zero (the same run, done once).
Then for each later drop, through launch/weekly.py as a user runs it:

- warm:  vocabularies grown from the warm arm's last week (prepare.parent), examples of the last
         ``--window-days`` only, training warm-started from that week's selected checkpoint
         (``--warm-args``: its budget; validation and early stopping as any run);
- full:  vocabularies afresh, every example, training from zero (``--full-args``: its budget; the demo's
         one epoch on a CPU by default).

Each is exported, indexed and evaluated on the drop's validation week by the evaluation stage. Printed side by
side per week, from one run: MAP@12 and Recall@12, Recall@12 by kind of article (never sold / first sold in
the 28 days before / older) with the new-article best-seller list beside them, examples processed and the
training wall time, each as warm / full. Written to ``<out>/weekly.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = "prepare,train,export,index,evaluate"


def weekly(chain: pathlib.Path, drop: pathlib.Path, nproc: int, train_args: str, data: str, runs: pathlib.Path,
           *extra: str) -> None:
    cmd = [sys.executable, "-m", "launch.weekly", "--chain", str(chain), "--drop", str(drop), "--nproc", str(nproc),
           "--stages", STAGES, "--train-args", train_args, f"data={data}", f"paths.runs={runs}", *extra]
    print("[bench]", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def id_table_bytes(train: pathlib.Path, step: int | None) -> dict:
    """Bytes of the customer and article tables in the run's checkpoint at ``step`` (else its newest): the
    weights, their optimiser state and, with managed ids, the maps (held whole on every rank); with the
    rows of each table."""
    import torch.distributed.checkpoint as dcp

    folder = train / "checkpoints"
    steps = sorted(folder.glob("step-*"))
    path = folder / f"step-{step:08d}" if step is not None and (folder / f"step-{step:08d}").exists() else steps[-1]
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    out = {"tables": 0, "maps": 0, "rows": {}}
    for key, m in meta.items():
        if not hasattr(m, "size"):
            continue
        n = 1
        for d in m.size:
            n *= d
        size = n * m.properties.dtype.itemsize
        if key.startswith("model.managed."):
            out["maps"] += size
        elif any(f".{t}.weight" in key for t in ("t_customer_id", "t_article")):
            out["tables"] += size
            if key.startswith("model."):
                out["rows"][key.split(".")[-2]] = int(m.size[0])
    return out


def week_figures(week: pathlib.Path) -> dict:
    ev = json.loads((week / "evaluate" / "evaluation.json").read_text())
    metrics = json.loads((week / "train" / "metrics.json").read_text())
    stages = json.loads((week / "stages.json").read_text())
    model = ev["full_catalogue"]["two-tower"]
    kinds = ev["by_article_kind"]
    return {"map@12": model["map@12"], "recall@12": model["recall@12"],
            "by_kind": {k: v["recall@12"] for k, v in kinds["two-tower"].items()},
            "kind_share": {k: v["share"] for k, v in kinds["two-tower"].items()},
            "new_best_sellers": {k: v["recall@12"] for k, v in kinds["new-article best-sellers"].items()},
            "examples": metrics["examples_trained"], "steps": metrics["step"], "train_s": stages.get("train"),
            "best": metrics.get("best"), "warm_start": metrics.get("warm_start"),
            "id_tables": id_table_bytes(week / "train", (metrics.get("best") or {}).get("step"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="small")
    p.add_argument("--weeks", type=int, default=4, help="warm-started weeks after the first")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--window-days", type=int, default=28)
    p.add_argument("--full-args", default="trainer.epochs=1", help="training overrides of the full retrain")
    p.add_argument("--warm-args", default="trainer.epochs=3", help="training overrides of the warm start")
    p.add_argument("--common-args", default="", help="training overrides of both arms (model, loss)")
    p.add_argument("--full-grows", action="store_true",
                   help="the full arm grows its vocabularies from its last week (launch/weekly.py --retrain: it "
                        "knows which articles are new listings, as the warm arm does) and trains from zero")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "weekly"))
    args = p.parse_args()
    out = pathlib.Path(args.out)
    datasets, runs = out / "datasets", out / "runs"
    data_root = datasets / args.data
    py = [sys.executable, "-m"]
    if not (data_root / "manifest.json").exists():
        subprocess.run([*py, "data.synth", f"data={args.data}", f"paths.datasets={datasets}", f"paths.runs={runs}"],
                       cwd=ROOT, check=True)
    drops = out / "drops"
    if not (drops / f"week-{args.weeks + 1:02d}" / "manifest.json").exists():
        subprocess.run([*py, "data.drops", f"data={args.data}", f"paths.datasets={datasets}", f"paths.runs={runs}",
                        f"drops.weeks={args.weeks + 1}", f"drops.out={drops}"], cwd=ROOT, check=True)
    warm, full = out / "warm", out / "full"
    common = args.common_args
    report = {"data": args.data, "nproc": args.nproc, "window_days": args.window_days, "full_args": args.full_args,
              "warm_args": args.warm_args, "common_args": common, "full_grows": args.full_grows, "weeks": []}
    t0 = time.time()
    for k in range(1, args.weeks + 2):
        name = f"week-{k:02d}"
        grow = (["--retrain", "--parent", str(full / f"week-{k - 1:02d}")] if args.full_grows and k > 1
                else ["--from-zero"])
        weekly(full, drops / name, args.nproc, f"{common} {args.full_args}", args.data, runs, *grow)
        if k == 1:  # the first week: one run from zero serves both arms
            if not (warm / name).exists():
                shutil.copytree(full / name, warm / name)
            continue
        weekly(warm, drops / name, args.nproc, f"{common} {args.warm_args}", args.data, runs,
               "--parent", str(warm / f"week-{k - 1:02d}"), f"--window-days={args.window_days}")
        row = {"week": name, "warm": week_figures(warm / name), "full": week_figures(full / name)}
        report["weeks"].append(row)
        print_row(row)
    report["wall_s"] = round(time.time() - t0, 1)
    os.makedirs(out, exist_ok=True)
    (out / "weekly.json").write_text(json.dumps(report, indent=1))
    print_table(report)


def print_row(row: dict) -> None:
    w, f = row["warm"], row["full"]
    print(f"[bench] {row['week']}: MAP@12 warm {w['map@12']:.4f} full {f['map@12']:.4f}; examples "
          f"{w['examples'] / f['examples']:.3f}x, train time {w['train_s'] / f['train_s']:.3f}x", file=sys.stderr,
          flush=True)


def mb(figures: dict) -> str:
    """The customer and article tables' megabytes (weights and optimiser state, plus the maps if managed)."""
    t = figures.get("id_tables")
    return "-" if not t else f"{(t['tables'] + t['maps']) / 2**20:.1f}"


def print_table(report: dict) -> None:
    kinds = list(report["weeks"][0]["warm"]["by_kind"]) if report["weeks"] else []
    head = ["week", "MAP@12 warm / full", "Recall@12 warm / full",
            *[f"{k} warm / full / list" for k in kinds], "examples warm/full", "train time warm/full",
            "id tables MB warm / full"]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for row in report["weeks"]:
        w, f = row["warm"], row["full"]
        cells = [row["week"], f"{w['map@12']:.4f} / {f['map@12']:.4f}", f"{w['recall@12']:.4f} / {f['recall@12']:.4f}"]
        cells += [f"{w['by_kind'][k]:.3f} / {f['by_kind'][k]:.3f} / {f['new_best_sellers'][k]:.3f}" for k in kinds]
        cells += [f"{w['examples'] / f['examples']:.3f}", f"{w['train_s'] / f['train_s']:.3f}",
                  " / ".join(f"{mb(a)}" for a in (w, f))]
        print("| " + " | ".join(cells) + " |")
    if report["weeks"]:
        share = report["weeks"][-1]["full"]["kind_share"]
        print("\nshare of the validation week's purchase pairs: " + ", ".join(f"{k} {v:.1%}" for k, v in share.items()))


if __name__ == "__main__":
    main()
