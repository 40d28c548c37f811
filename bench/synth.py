"""Generator benchmark: rows/s and peak RSS per preset, next to a per-row Python generator.

    .venv/bin/python bench/synth.py                   # tiny and small
    .venv/bin/python bench/synth.py --presets small hm_scale

Each preset runs as its own `python -m data.synth` process (so peak RSS is that run's alone) into a
temporary folder. The naive reference draws the same kind of rows one at a time in Python (customer by
activity, article by weekly popularity, a dict of past purchases for repurchases) on a sample, so the
ratio of the two rates is measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_preset(preset: str, out: str) -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "data.synth", f"data={preset}", f"paths.datasets={out}",
                    f"paths.runs={out}/runs", "hydra/job_logging=none", "hydra/hydra_logging=none"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - t0
    manifest = json.loads((pathlib.Path(out) / preset / "manifest.json").read_text())
    manifest["wall_s"] = wall
    return manifest


def naive_rows_per_s(n_rows: int = 100_000, n_customers: int = 50_000, n_articles: int = 10_000) -> float:
    """The per-row way: one Python draw per transaction, dict-based purchase memory, list of rows."""
    rng = random.Random(0)
    activity = [rng.lognormvariate(0, 1.2) for _ in range(n_customers)]
    popularity = [rng.lognormvariate(0, 1.6) for _ in range(n_articles)]
    history: dict[int, list[int]] = {}
    rows = []
    t0 = time.perf_counter()
    start = dt.date(2018, 9, 20)
    for i in range(n_rows):
        if i % 2000 == 0:  # popularity drifts: reweigh now and then
            popularity = [p * rng.uniform(0.9, 1.1) for p in popularity]
            cum_pop = list(_cumsum(popularity))
            cum_act = list(_cumsum(activity))
        c = _draw(rng, cum_act)
        past = history.get(c)
        a = rng.choice(past) if past and rng.random() < 0.12 else _draw(rng, cum_pop)
        history.setdefault(c, []).append(a)
        rows.append({"t_dat": start + dt.timedelta(days=i * 7 // 30_000), "customer_id": f"{c:064x}",
                     "article_id": a, "price": 0.02 * rng.uniform(0.5, 1.0), "sales_channel_id": 1 + (rng.random() < 0.7)})
    return n_rows / (time.perf_counter() - t0)


def _cumsum(xs):
    total = 0.0
    for x in xs:
        total += x
        yield total


def _draw(rng, cum):
    import bisect
    return min(bisect.bisect_right(cum, rng.random() * cum[-1]), len(cum) - 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--naive-rows", type=int, default=100_000)
    args = ap.parse_args()
    naive = naive_rows_per_s(args.naive_rows)
    print(f"{'preset':<10} {'rows':>12} {'wall s':>8} {'rows/s':>12} {'peak RSS MB':>12} {'vs per-row':>11}")
    for preset in args.presets:
        with tempfile.TemporaryDirectory() as out:
            m = run_preset(preset, out)
        rate = m["transactions"] / m["seconds"]
        print(f"{preset:<10} {m['transactions']:>12,} {m['wall_s']:>8.1f} {rate:>12,.0f} {m['peak_rss_mb']:>12,} "
              f"{rate / naive:>10.1f}x", flush=True)
    print(f"{'per-row':<10} {args.naive_rows:>12,} {'':>8} {naive:>12,.0f} {'':>12} {1.0:>10.1f}x")


if __name__ == "__main__":
    main()
