"""MovieLens-100K end to end through the project, beside strong baselines on the same split.

The data: the ``recbole`` wheel on PyPI ships the original ml-100k (``recbole/dataset_example/ml-100k``);
it is fetched with pip, converted to the GroupLens files ``data.ingest`` reads (``u.data`` sorted by user
and timestamp, so file order within a day is time order) and kept under ``datasets/`` (git-ignored).

The split: leave-last-one-out per user by timestamp (ties in file order): test = each user's last rating,
validation = the one before; every rating is an implicit positive; full-catalogue ranking with the
user's earlier items left out; 943 users. The bench computes this split itself from the raw ratings
and checks that the project's prepared evaluation sets hold the same targets.

Rows of the table:
  * the project's two-tower as ``experiment=movielens`` sets it (the history as a sequence through the
    transformer encoder), the same with the history as a mean-pooled bag, MF, and the project's defaults
    (``data=movielens`` alone, no preset), trained by ``trainer.train`` under torchrun on each world size of
    ``--nproc`` (the same global batch on every one), the checkpoint chosen on the validation item only
    (``export checkpoint=best``);
  * popularity (train + validation counts), item-kNN (cosine, neighbours tuned on validation), EASE
    (λ tuned on validation; Steck 2019), fitted here with numpy.
Every row is scored here (Recall@10/20, NDCG@10/20), independently of ``trainer/evaluation/metrics.py``.
The test items are looked at once, for this table.

``--split holdout``: the matching benchmarks' shape instead: no order (every rating given the same day), per
user a random 20% of the ratings are test and one more validation (``split=holdout``, histories a random
sample of the user's other training ratings: ``prepare.history_order=none``), Recall@K = test items in the
top K over the user's test items, NDCG@K with the ideal DCG over min(test items, K); the same baselines.

    .venv/bin/python bench/movielens.py                    # fetch, prepare, train, score: a few minutes
    .venv/bin/python bench/movielens.py --nproc 1 2 4      # a table per world size, and their spread
    .venv/bin/python bench/movielens.py --models two_tower --override trainer.epochs=5 --seeds 0 1
    .venv/bin/python bench/movielens.py --split holdout --models defaults mf --nproc 2
"""

from __future__ import annotations

import argparse
import glob
import json
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pyarrow.parquet as pq

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable
GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
PREPARE = {"loo": ["split=leave_last_n", "split.n=1", "split.test_n=1", "prepare.history_len=50"],
           "holdout": ["split=holdout", "split.n=1", "split.test_ratio=0.2", "prepare.history_len=50",
                       "prepare.history_order=none"]}
DATA = {"loo": [], "holdout": ["data.name=ml-100k-holdout"]}  # its own dataset folder (one day, no order)
MODELS = {"two_tower": ["experiment=movielens"], "two_tower_bag": ["experiment=movielens", "model.history_encoder=bag"],
          "mf": ["experiment=movielens", "model=mf"], "defaults": ["data=movielens"]}


# ---------------------------------------------------------------- data


def fetch(cache: pathlib.Path) -> dict[str, bytes]:
    """The ml-100k atomic files of the recbole wheel (downloaded once into ``cache``)."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = glob.glob(str(cache / "recbole-1.2.1-*.whl"))
    if not wheels:
        subprocess.run([PY, "-m", "pip", "download", "-q", "--no-deps", "recbole==1.2.1", "-d", str(cache)],
                       check=True)
        wheels = glob.glob(str(cache / "recbole-1.2.1-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        return {ext: z.read(f"recbole/dataset_example/ml-100k/ml-100k.{ext}") for ext in ("inter", "item", "user")}


def atomic(raw: bytes) -> list[list[str]]:
    lines = raw.decode("latin-1").splitlines()
    return [line.split("\t") for line in lines[1:] if line]


def convert(files: dict[str, bytes], out: pathlib.Path, one_day: bool = False) -> np.ndarray:
    """GroupLens ml-100k files from recbole's; returns the ratings (user, item, timestamp) in file order.
    ``one_day``: every rating at the first rating's time (no order left to learn)."""
    out.mkdir(parents=True, exist_ok=True)
    inter = np.array([[int(u), int(i), int(float(r)), int(float(t))] for u, i, r, t in atomic(files["inter"])])
    if one_day:
        inter[:, 3] = inter[:, 3].min()
    order = np.lexsort((np.arange(len(inter)), inter[:, 3], inter[:, 0]))  # by user, then time, then file order
    inter = inter[order]
    (out / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in inter))
    items = []
    for item_id, title, year, classes in atomic(files["item"]):
        flags = ["1" if g in classes.split(" ") else "0" for g in GENRES]
        year = year if year.isdigit() else ""
        items.append("|".join([item_id, f"{title} ({year})" if year else title, f"01-Jan-{year}" if year else "",
                               "", "http://x", *flags]))
    (out / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    users = ["|".join(row) for row in atomic(files["user"])]
    (out / "u.user").write_bytes(("\n".join(users) + "\n").encode("latin-1"))
    return inter[:, [0, 1, 3]]


def split(ratings: np.ndarray) -> tuple[np.ndarray, dict, dict]:
    """Leave-last-one-out on ratings sorted by (user, time, file order): train rows, {user: val item},
    {user: test item}, for users with at least three ratings."""
    users = ratings[:, 0]
    last = np.r_[users[1:] != users[:-1], True]
    counts = np.bincount(users)[users]
    test_row = last & (counts >= 3)
    val_row = np.r_[test_row[1:], False]
    train = ratings[~(test_row | val_row)]
    return train, dict(zip(*ratings[val_row][:, :2].T)), dict(zip(*ratings[test_row][:, :2].T))


def holdout_split(ratings: np.ndarray, prepared: pathlib.Path) -> tuple[np.ndarray, dict, dict]:
    """The per-user random split as prepare drew it (its evaluation sets), checked here: per user round(20%)
    test items (at least one), one validation item, disjoint, the rest training. Returns train rows,
    {user: {val items}}, {user: {test items}}."""
    held = {}
    for period in ("val", "test"):
        t = pq.read_table(prepared / "eval" / f"{period}.parquet", columns=["customer_id", "target_article_ids"])
        held[period] = {int(c): {int(a) for a in ts} for c, ts in zip(t["customer_id"].to_pylist(),
                                                                       t["target_article_ids"].to_pylist())}
    val, test = held["val"], held["test"]
    counts = np.bincount(ratings[:, 0])
    for u, items in test.items():
        assert len(items) == max(1, int(np.floor(0.2 * counts[u] + 0.5))) and len(val[u]) == 1 and not items & val[u], u
    out = np.array([u in test and (i in test[u] or i in val[u]) for u, i in ratings[:, :2]])
    return ratings[~out], val, test


# ---------------------------------------------------------------- scoring (independent of trainer/evaluation/metrics.py)


def score(ranked: dict, truth: dict, ks=(10, 20)) -> dict:
    """Over the users of ``truth`` (user -> one item, or a set of items): Recall@k = relevant items in the
    top k over the user's relevant items (the hit rate with one), NDCG@k with the ideal DCG over
    min(relevant, k)."""
    out = {}
    for k in ks:
        rec, ndcg = [], []
        for user, items in truth.items():
            items = items if isinstance(items, (set, frozenset)) else {items}
            top = list(ranked[user][:k])
            gains = [1.0 / np.log2(r + 2) for r, item in enumerate(top) if item in items]
            rec.append(len(gains) / len(items))
            ndcg.append(sum(gains) / sum(1.0 / np.log2(r + 2) for r in range(min(len(items), k))))
        out[f"recall@{k}"], out[f"ndcg@{k}"] = float(np.mean(rec)), float(np.mean(ndcg))
    return out


def rank_scores(scores: np.ndarray, users: list, seen: dict, k: int = 20) -> dict:
    """Top-k item ids per user from a (users, items+1) score matrix (column = item id), seen left out."""
    s = scores.copy()
    s[:, 0] = -np.inf
    for row, user in enumerate(users):
        s[row, list(seen[user])] = -np.inf
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return {user: top[row].tolist() for row, user in enumerate(users)}


def matrix(rows: np.ndarray, n_users: int, n_items: int) -> np.ndarray:
    x = np.zeros((n_users + 1, n_items + 1), np.float64)
    x[rows[:, 0], rows[:, 1]] = 1.0
    return x


def ease(x: np.ndarray, lam: float) -> np.ndarray:
    g = x.T @ x
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = p / (-np.diag(p))
    b[np.diag_indices_from(b)] = 0.0
    return x @ b


def item_knn(x: np.ndarray, k: int) -> np.ndarray:
    norms = np.sqrt(x.sum(0)) + 1e-9
    sim = (x.T @ x) / norms[:, None] / norms[None, :]
    np.fill_diagonal(sim, 0.0)
    cut = np.argsort(-sim, axis=1)[:, k:]
    np.put_along_axis(sim, cut, 0.0, axis=1)
    return x @ sim.T


def as_set(x) -> set:
    return set(x) if isinstance(x, (set, frozenset)) else {x}


def baselines(train: np.ndarray, val: dict, test: dict, n_users: int, n_items: int) -> dict:
    """Each baseline tuned on validation (fitted on train), then refitted on train + validation for test."""
    users = sorted(test)
    seen_val = {u: set(train[train[:, 0] == u, 1]) for u in users}
    seen_test = {u: seen_val[u] | as_set(val[u]) for u in users}
    full = np.vstack([train[:, :2], np.array([[u, i] for u in users for i in as_set(val[u])])])
    x_train, x_full = matrix(train, n_users, n_items), matrix(full, n_users, n_items)
    out = {}
    pop = x_full.sum(0)
    out["popularity"] = score(rank_scores(np.tile(pop, (len(users), 1)), users, seen_test), test)
    for name, fit, grid in (("item-kNN", item_knn, [20, 50, 100, 200, 400]),
                            ("EASE", ease, [50.0, 100.0, 250.0, 500.0, 1000.0])):
        tuned = {p: score(rank_scores(fit(x_train, p)[users], users, seen_val), {u: val[u] for u in users})["recall@20"]
                 for p in grid}
        best = max(tuned, key=tuned.get)
        out[f"{name} ({'k' if name == 'item-kNN' else 'λ'}={best:g})"] = score(
            rank_scores(fit(x_full, best)[users], users, seen_test), test)
    return out


# ---------------------------------------------------------------- the project


def run(args: list[str]) -> None:
    proc = subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(args[:3])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")


def project_model(name: str, overrides: list[str], paths: list[str], out: pathlib.Path, val: dict, test: dict,
                  seen_test: dict, nproc: int = 1, data: list[str] = ()) -> tuple[dict, dict]:
    """Train on ``nproc`` processes, export the best-on-validation checkpoint, rank the test users' unseen
    items exactly."""
    train_dir, export_dir = out / f"train-{name}", out / f"export-{name}"
    run(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "trainer.train",
         *MODELS[name], *data, *paths, f"hydra.run.dir={train_dir}", "trainer.resume=false",
         "trainer.progress=false", *overrides])
    run(["-m", "trainer.export", "data=movielens", *data, *paths, f"train_dir={train_dir}", "checkpoint=best",
         f"hydra.run.dir={export_dir}"])
    metrics = json.loads((train_dir / "metrics.json").read_text())
    items = pq.read_table(export_dir / "output" / "items.parquet")
    users = pq.read_table(export_dir / "output" / "users_test.parquet")
    item_vec = np.array(items["embedding"].to_pylist(), np.float32)
    item_id = np.array(items["article_id"].to_pylist())
    user_vec = np.array(users["embedding"].to_pylist(), np.float32)
    user_id = [int(u) for u in users["customer_id"].to_pylist()]
    n_items = int(item_id.max())
    by_id = np.full((len(user_id), n_items + 1), -np.inf, np.float32)
    scores = user_vec @ item_vec.T
    valid = item_id > 0  # row 0: the OOV bucket
    by_id[:, item_id[valid]] = scores[:, valid]
    ranked = rank_scores(by_id, user_id, seen_test)
    return score({u: ranked[u] for u in test}, test), metrics.get("best", {})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-movielens"))
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--override", nargs="*", default=[], help="Hydra overrides for the project's training")
    ap.add_argument("--nproc", type=int, nargs="*", default=[1], help="world sizes to train each row on")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0], help="trainer.seed of each run (rows: the mean)")
    ap.add_argument("--prepare", nargs="*", default=[], help="Hydra overrides for data.prepare (after the split's)")
    ap.add_argument("--split", choices=list(PREPARE), default="loo",
                    help="loo: leave-last-one-out by time; holdout: per-user random 20%% test, no order")
    args = ap.parse_args()
    out = pathlib.Path(args.out) / ("" if args.split == "loo" else args.split)
    unordered = args.split == "holdout"
    raw = ROOT / "datasets" / "raw" / ("ml-100k-one-day" if unordered else "ml-100k")
    ratings = convert(fetch(ROOT / "datasets" / "raw" / "cache"), raw, one_day=unordered)
    paths = [f"paths.datasets={ROOT / 'datasets'}", f"paths.runs={out}"]
    data = DATA[args.split]
    run(["-m", "data.ingest", "data=movielens", *data, f"data.raw_dir={raw}", *paths])
    run(["-m", "data.prepare", "data=movielens", *data, *paths, *PREPARE[args.split], *args.prepare])

    prepared = ROOT / "datasets" / ("ml-100k-holdout" if unordered else "ml-100k") / "prepared"
    train, val, test = holdout_split(ratings, prepared) if unordered else split(ratings)
    n_users, n_items = int(ratings[:, 0].max()), int(ratings[:, 1].max())
    for period, truth in (("val", val), ("test", test)):  # the project's split is the same split
        t = pq.read_table(prepared / "eval" / f"{period}.parquet", columns=["customer_id", "target_article_ids"])
        mine = {int(c): [int(a) for a in ts] for c, ts in zip(t["customer_id"].to_pylist(),
                                                              t["target_article_ids"].to_pylist())}
        assert {u: set(ts) for u, ts in mine.items()} == {u: as_set(i) for u, i in truth.items()}, \
            f"prepare's {period} set differs from the bench's split"
    seen_test = {u: set(train[train[:, 0] == u, 1]) | as_set(val.get(u, set())) for u in test}
    fitted = baselines(train, val, test, n_users, n_items)
    tables = {}
    for nproc in args.nproc:
        rows = {}
        for name in args.models:
            runs = []
            for seed in args.seeds:
                where = out / f"nproc{nproc}" / f"seed{seed}"
                got, best = project_model(name, [*args.override, f"trainer.seed={seed}"], paths, where, val, test,
                                          seen_test, nproc, data)
                runs.append(got)
                print(f"{nproc} process(es), project {name}, seed {seed}: test {got}; best validation {best}",
                      flush=True)
            rows[f"project {name}"] = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        rows.update(fitted)
        tables[nproc] = rows
        seeds = f", mean of seeds {args.seeds}" if len(args.seeds) > 1 else ""
        shape = "per-user random 20% holdout, no order" if unordered else "leave-last-one-out"
        print(f"\nMovieLens-100K, {shape}, {len(test)} users, full-catalogue ranking of unseen items "
              f"(test items; hyper-parameters and checkpoints chosen on the validation item); the project's rows "
              f"trained on {nproc} process(es){seeds}")
        print("| model | Recall@10 | Recall@20 | NDCG@10 | NDCG@20 |\n|---|---:|---:|---:|---:|")
        for name, m in rows.items():
            print(f"| {name} | {m['recall@10']:.4f} | {m['recall@20']:.4f} | {m['ndcg@10']:.4f} | {m['ndcg@20']:.4f} |")
    if len(tables) > 1:
        print("\nTest Recall@20 by world size (the same global batch on each):")
        print("| model | " + " | ".join(f"{n} proc" for n in tables) + " | spread |\n|---|"
              + "---:|" * (len(tables) + 1))
        for name in [f"project {m}" for m in args.models]:
            values = [tables[n][name]["recall@20"] for n in tables]
            print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {max(values) - min(values):.4f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "movielens.json").write_text(json.dumps({str(n): rows for n, rows in tables.items()}, indent=1))


if __name__ == "__main__":
    main()
