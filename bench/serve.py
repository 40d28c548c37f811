"""Serving benchmark: the bundle (trainer/serving/bundle.py) in-process and over HTTP (trainer/serve.py),
beside the Retriever inside the training code, on the same validation customers, in one run.

For a trained run it builds the fp32 and the INT8 bundle (``python -m trainer.bundle``) and prints:
  * latency at batch 1 (p50/p99 ms) and queries/s at batch 256: the Retriever in the training code
    (Embedder.queries + Retriever.top_k, exact search), each bundle in-process, the INT8 bundle over HTTP;
  * each bundle's Recall@12 / MAP@12 on the validation customers, scored by trainer/evaluation/metrics.py;
  * peak memory (loading and answering, in a fresh process) and size on disk, against the run's
    checkpoint.

    .venv/bin/python bench/serve.py --data small                 # runs/small/train, after launch/run.sh
    .venv/bin/python bench/serve.py --data small --queries 1000 --train runs/small/train

Goals on a 2-core CPU: p99 <= 20 ms for one query over `small`'s 10k articles; the INT8 bundle's
Recall@12 within 0.005 of fp32's.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable


def run(args: list[str]) -> None:
    proc = subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(args[:3])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")


def du(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def timed(fn, batches: list) -> list[float]:
    fn(batches[0])  # warm-up
    out = []
    for b in batches:
        t0 = time.perf_counter()
        fn(b)
        out.append(time.perf_counter() - t0)
    return out


def peak_rss_mb(bundle: pathlib.Path, ids: list[str], scratch: pathlib.Path) -> float:
    """Peak resident memory of a fresh process that loads the bundle and answers every query once."""
    (scratch / "ids.json").write_text(json.dumps(ids))
    # VmHWM: this process image's own peak (ru_maxrss keeps the peak from before exec, the parent's size)
    code = (f"import json; from trainer.serving.bundle import Bundle; b = Bundle.load({str(bundle)!r}); "
            f"ids = json.load(open({str(scratch / 'ids.json')!r})); "
            "[b.recommend(customer_ids=ids[i:i + 256], k=12) for i in range(0, len(ids), 256)]; "
            "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024)")
    out = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def http(port: int, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/recommend", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="small")
    ap.add_argument("--train", default=None, help="the train run (default runs/<data>/train)")
    ap.add_argument("--out", default=None, help="where the bundles go (default runs/<data>/bench-serve)")
    ap.add_argument("--queries", type=int, default=500, help="batch-1 queries timed")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the server's serve.threads)")
    ap.add_argument("--customers", type=int, default=0, help="validation customers sampled (0: all)")
    ap.add_argument("--clients", default="8,32", help="concurrent HTTP clients to measure, comma-separated")
    ap.add_argument("--concurrent-requests", type=int, default=2000, help="one-customer requests per client count")
    args = ap.parse_args()
    train = pathlib.Path(args.train or ROOT / "runs" / args.data / "train").resolve()
    out = pathlib.Path(args.out or ROOT / "runs" / args.data / "bench-serve").resolve()
    import torch

    from data import vocab
    from trainer.retrieval.search import list_column
    from trainer.parallel import distributed as D
    from trainer.loop.runs import load_run
    from trainer.retrieval.retriever import Retriever
    from trainer.serving.bundle import Bundle

    torch.set_num_threads(args.threads)
    embedder, info = load_run(str(train), "selected", device="cpu")
    table = embedder.eval_rows("val")
    if args.customers and table.num_rows > args.customers:  # a sample, for hm_scale's 93k
        table = table.take(np.sort(np.random.default_rng(1).choice(table.num_rows, args.customers, replace=False)))
    val_day = np.unique(table["day"].to_numpy())
    assert len(val_day) == 1, "the bench compares on a week split's validation customers (one day)"
    # bundles as of the validation day: the customers' histories the Retriever is given below
    index_dir = pathlib.Path(train).parent / "index"  # the index stage's beside the run (as launch/run.sh leaves it)
    index = f"index_dir={index_dir}" if (index_dir / "output" / "index.faiss").exists() else "index_dir=null"
    for name, int8 in (("fp32", "false"), ("int8", "true")):
        run(["-m", "trainer.bundle", f"data={args.data}", f"train_dir={train}", f"bundle.int8={int8}", index,
             f"bundle.as_of={np.datetime64(int(val_day[0]), 'D')}", f"hydra.run.dir={out / name}"])
    bundles = {name: out / name / "output" for name in ("fp32", "int8")}
    customers = table["customer_idx"].to_numpy()
    raw = vocab.load(embedder.prepared, "customer_id")["value"].take(customers - 1).to_pylist()
    raw = [str(x) for x in raw]
    targets = list_column(table, "targets")
    rng = np.random.default_rng(0)
    one = [[int(i)] for i in rng.choice(len(raw), min(args.queries, len(raw)), replace=False)]
    full = [np.arange(lo, min(lo + args.batch, len(raw))) for lo in range(0, len(raw), args.batch)]
    rows: dict[str, dict] = {}

    # the Retriever inside the training code: query vectors from the TorchRec model, exact search
    retriever = Retriever.from_embedder(embedder)
    history = list_column(table, "history")
    days = table["day"].to_numpy()

    def training_code(at):
        at = np.asarray(at)
        q = embedder.queries(customers[at], days[at], history.take(at))
        return retriever.rank(embedder.as_queries(q, retriever.items), 12, recent=history.take(at))

    ranked = np.concatenate([training_code(b) for b in full])
    rows["Retriever in the training code (exact)"] = {
        "p50/p99": percentiles(timed(training_code, one)),
        "qps": len(raw) / sum(timed(training_code, full)), **quality(ranked, targets)}
    D.shutdown()

    for name, path in bundles.items():
        t0 = time.perf_counter()
        b = Bundle.load(str(path))
        load_s = time.perf_counter() - t0
        for exact in (True, False):
            def answer(at, b=b, exact=exact):
                return b.recommend(customer_ids=[raw[i] for i in at], k=12, exclude_seen=False, exact=exact)
            got = [answer(batch) for batch in full]
            ranked = np.concatenate([b.article_rows(np.array(a.article_ids).reshape(-1)).reshape(-1, 12) for a in got])
            search = "exact" if exact else f"IVF nprobe {b.index.nprobe}"
            rows[f"bundle {name}, in-process ({search})"] = {
                "p50/p99": percentiles(timed(answer, one)), "qps": len(raw) / sum(timed(answer, full)),
                **quality(ranked, targets), "peak_mb": peak_rss_mb(path, raw, out) if not exact else None,
                "load_s": load_s if not exact else None}

    port = free_port()
    log = open(out / "serve.log", "w")
    proc = subprocess.Popen([PY, "-m", "trainer.serve", f"data={args.data}", f"serve.bundle={bundles['int8']}",
                             f"serve.port={port}", f"serve.max_batch={args.batch}", f"serve.threads={args.threads}", f"hydra.run.dir={out / 'serve'}"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_up(port, proc)
        single = [{"customer_id": raw[i[0]], "k": 12, "exclude_seen": False} for i in one]
        batches = [{"queries": [{"customer_id": raw[i]} for i in b], "k": 12, "exclude_seen": False} for b in full]
        rows["bundle int8, over HTTP (IVF)"] = {"p50/p99": percentiles(timed(lambda body: http(port, body), single)),
                                                "qps": len(raw) / sum(timed(lambda body: http(port, body), batches)),
                                                "peak_mb": server_peak_mb(proc.pid)}
        spread = [{"customer_id": raw[i], "k": 12, "exclude_seen": False} for i in range(len(raw))]
        for n in [int(c) for c in str(args.clients).split(",") if c]:
            got = concurrent(port, spread, n, args.concurrent_requests)
            rows[f"bundle int8, over HTTP, {n} clients (IVF)"] = {**got, "peak_mb": server_peak_mb(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(30)

    checkpoint = pathlib.Path(info.checkpoint)
    print(f"\nServing `{args.data}`: {len(raw):,} validation customers, {len(b.article_ids) - 1:,} articles, "
          f"{torch.get_num_threads()} torch threads; batch-1 latency over {len(one)} queries, queries/s at "
          f"batch {args.batch} over all")
    print("| path | p50 ms | p99 ms | queries/s | Recall@12 | MAP@12 | peak MB | load s |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        p50, p99 = r["p50/p99"]
        errors = f" ({r['errors']} errors)" if r.get("errors") is not None else ""
        print(f"| {name}{errors} | {p50:.2f} | {p99:.2f} | {r['qps']:,.0f} | {fmt(r.get('recall@12'))} | "
              f"{fmt(r.get('map@12'))} | {fmt(r.get('peak_mb'), '.0f')} | {fmt(r.get('load_s'), '.1f')} |")
    ck = du(checkpoint)
    parts = {name: parts_mb(path) for name, path in bundles.items()}
    print(f"\nSize on disk against the checkpoint ({checkpoint.name}, {ck / 1e6:.1f} MB, fp32 tables and the "
          "optimisers' state):\n| part | " + " | ".join(f"{n} MB | {n} x ckpt" for n in parts) + " |\n|---|" +
          "---:|---:|" * len(parts))
    for part in parts["int8"]:
        print(f"| {part} | " + " | ".join(f"{p[part]:.1f} | {p[part] * 1e6 / ck:.3f}" for p in parts.values()) + " |")
    (out / "serve.json").write_text(json.dumps(rows, indent=1, default=str))


def concurrent(port: int, bodies: list[dict], clients: int, total: int) -> dict:
    """``clients`` threads, each on its own kept-alive connection, send ``total`` one-customer requests between
    them as fast as answers come: each request's latency, the requests per second, the non-200 answers."""
    import http.client
    import queue
    import threading

    work: queue.Queue = queue.Queue()
    for i in range(total):
        work.put(json.dumps(bodies[i % len(bodies)]).encode())
    seconds, errors, lock = [], [0], threading.Lock()

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            try:
                body = work.get_nowait()
            except queue.Empty:
                break
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/recommend", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except OSError:
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                seconds.append(time.perf_counter() - t0)
                errors[0] += int(not ok)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"p50/p99": percentiles(seconds), "qps": total / wall, "errors": errors[0], "clients": clients}


def parts_mb(bundle: pathlib.Path) -> dict[str, float]:
    """MB on disk per part of a bundle: the query tower, the customers' ids, histories, older bought
    articles and features (Parquet column chunks), the item side, and the whole."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(bundle / "customers.parquet").metadata
    cols: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            chunk = meta.row_group(g).column(c)
            top = chunk.path_in_schema.split(".")[0]
            key = top if top in ("customer_id", "history", "older") else "customer features"
            cols[key] = cols.get(key, 0) + chunk.total_compressed_size
    size = {f.name: f.stat().st_size for f in bundle.iterdir()}
    out = {"query tower (tables, layers)": size["query_tower.pt2"]}
    out.update({f"customers: {k}": v for k, v in cols.items()})
    out["customers: Parquet framing"] = size["customers.parquet"] - sum(cols.values())
    out["items: ids, titles"] = size["items.parquet"]
    out["items: vectors in the IVF index"] = size["index.faiss"]
    out["manifest"] = size["manifest.json"]
    out["whole bundle"] = sum(size.values())
    return {k: v / 1e6 for k, v in out.items()}


def quality(ranked: np.ndarray, targets) -> dict:
    from trainer.evaluation.metrics import evaluate

    m = evaluate(ranked, targets, ks=(12,))
    return {"recall@12": m["recall@12"], "map@12": m["map@12"]}


def fmt(x, spec: str = ".4f") -> str:
    return "" if x is None else format(x, spec)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port: int, proc) -> None:
    for _ in range(1200):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"the server exited with {proc.returncode}")
            time.sleep(0.1)
    sys.exit("the server did not come up")


def server_peak_mb(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


if __name__ == "__main__":
    main()
