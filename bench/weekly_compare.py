"""Two runs of bench/weekly.py side by side, week by week: MAP@12 and Recall@12 of each arm, Recall@12 of the
articles never sold before and of those first sold in the 28 days before, the training wall time, and the
customer and article tables' memory (weights, optimiser state, maps).

    .venv/bin/python bench/weekly_compare.py bench/out/weekly8 bench/out/weekly9   # grown vs managed ids
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from weekly import id_table_bytes  # noqa: E402


def figures(run: pathlib.Path) -> dict:
    report = json.loads((run / "weekly.json").read_text())
    out = {}
    for row in report["weeks"]:
        for arm in ("warm", "full"):
            f = row[arm]
            tables = f.get("id_tables") or id_table_bytes(run / arm / row["week"] / "train",
                                                          (f.get("best") or {}).get("step"))
            out[(row["week"], arm)] = {**f, "id_tables": tables}
    return out


def main() -> None:
    a_dir, b_dir = (pathlib.Path(p) for p in sys.argv[1:3])
    a, b = figures(a_dir), figures(b_dir)
    print(f"A = {a_dir}, B = {b_dir}")
    print("| week | arm | MAP@12 A / B | Recall@12 A / B | never sold A / B | first sold in 28 days A / B | "
          "train s A / B | id tables MB A / B | rows A | rows B |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---|")
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        mb = [(f["id_tables"]["tables"] + f["id_tables"]["maps"]) / 2**20 for f in (x, y)]
        rows = [", ".join(f"{t} {n:,}" for t, n in f["id_tables"]["rows"].items()) for f in (x, y)]
        print(f"| {key[0]} | {key[1]} | {x['map@12']:.4f} / {y['map@12']:.4f} | {x['recall@12']:.4f} / "
              f"{y['recall@12']:.4f} | {x['by_kind']['never_sold']:.3f} / {y['by_kind']['never_sold']:.3f} | "
              f"{x['by_kind']['new_28d']:.3f} / {y['by_kind']['new_28d']:.3f} | "
              f"{x['train_s']:.0f} / {y['train_s']:.0f} | {mb[0]:.1f} / {mb[1]:.1f} | {rows[0]} | {rows[1]} |")


if __name__ == "__main__":
    main()
