"""The launch boost's trade, read off finished weeks: each week's export re-ranked at other boosts.

``model.launch_boost`` adds a constant to the scoring column of the articles listed since the parent
vocabulary that nobody has bought (trainer/model/sales.py); it changes no weight. So a week trained and
exported at one boost (``--used``, what its run had) is ranked here at others by moving that column, through
the ranker evaluation uses (trainer/retrieval/ranker.py, exact search; the evaluation stage searched the IVF
index, so the row at ``--used`` can differ from its report by the index's recall). Printed per week and
boost: MAP@12, Recall@12, and Recall@12 over the validation week's purchase pairs by kind of article.

    .venv/bin/python bench/launch_boost.py bench/out/weekly/warm/week-0{2,3,4,5} --used 0.025 \
        --boosts=-0.05,0,0.025

A week's run selects its checkpoint by validation at its own boost; with one validation per run (the
weekly simulation's one epoch) that choice does not depend on the boost, and these rows are what a run at
each boost would report.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.io import join  # noqa: E402
from data.prepared import Prepared  # noqa: E402
from data.staging import output_of  # noqa: E402
from trainer.evaluate import _repeat_level, load_eval, query_days  # noqa: E402
from trainer.evaluation import freshness as fresh  # noqa: E402
from trainer.evaluation.metrics import evaluate as metrics  # noqa: E402
from trainer.model.cold import training_sales  # noqa: E402
from trainer.retrieval import ivf as ix  # noqa: E402
from trainer.retrieval.ranker import Queries  # noqa: E402
from trainer.retrieval.retriever import Retriever  # noqa: E402


def week_rows(week: pathlib.Path, used: float, boosts: list[float], new_days: int = 28) -> list[dict]:
    prepared, export = str(week / "prepared"), str(week / "export")
    ds = Prepared.read(prepared)
    listed = ds.parent_rows("article_id")
    if listed is None:
        raise SystemExit(f"{week}: its prepared data has no parent; without one no article is a known new listing")
    customers, targets, history = load_eval(prepared, "val")
    days = query_days(prepared, "val")
    retriever = Retriever.from_export(export)
    users_url = join(output_of(export), "users_val.parquet")
    user_idx, users = ix.read_embeddings(users_url, "customer_idx")
    pos = {c: i for i, c in enumerate(user_idx.tolist())}
    at = np.array([pos[c] for c in customers.tolist()], np.int64)
    queries = Queries(users[at], _repeat_level(users_url, at))
    items = retriever.items_np()
    launches = np.flatnonzero(training_sales(prepared, len(items)) == 0)
    launches = launches[launches >= listed]
    kinds = fresh.pair_kinds(fresh.first_sold(prepared, len(items)), targets, days, new_days)
    rows = []
    for boost in boosts:
        moved = items.copy()
        moved[launches, -1] += boost - used
        ranked = Retriever(moved, retriever.buying_again, None, exclude=retriever.ranker.exclude).rank(
            queries, 12, recent=history)
        m = metrics(ranked, targets, ks=(12,), catalog_size=len(items) - 1)
        by_kind = fresh.recall_by_kind(ranked, targets, kinds, 12, new_days)
        rows.append({"week": f"{week.parent.name}/{week.name}", "boost": boost, "launches": int(len(launches)),
                     "map@12": m["map@12"], "recall@12": m["recall@12"],
                     **{k: v["recall@12"] for k, v in by_kind.items()}})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weeks", nargs="+", help="week folders of a chain (prepared/ and export/ inside)")
    p.add_argument("--used", type=float, required=True, help="the model.launch_boost the weeks were trained with")
    p.add_argument("--boosts", default="-0.05,0,0.01,0.025")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    boosts = [float(b) for b in args.boosts.split(",")]
    rows = [r for w in args.weeks for r in week_rows(pathlib.Path(w), args.used, boosts)]
    cols = ["map@12", "recall@12", "never_sold", "new_28d", "older"]
    print("| week | boost | " + " | ".join(cols) + " |\n|---|---:|" + "---:|" * len(cols))
    for r in rows:
        print(f"| {r['week']} | {r['boost']:g} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
