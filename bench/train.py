"""Training throughput at H&M-scale vocabularies (1,371,980 customers, 105,542 articles), batch 2048,
dim 32, measured side by side in one run:

  * trainer (stream-fed): trainer.Trainer steps fed by data.stream, as in a real run;
  * trainer (in-memory):  the same steps over batches already in memory: the stream's cost is the gap;
  * notebook way: a per-row Dataset over raw transactions with Python-dict id lookups, dense
    nn.Embedding tables updated by Adam, in-batch softmax.

The trainer runs twice: with the notebook's model and loss (id embeddings only, in-batch softmax:
``model=mf loss=in_batch``), so the ratio compares the machinery on the same work; and with the
default model and loss (features, history bag, MLP towers, logQ, masking, 1,024 mixed negatives),
which does several times the work per example.

    .venv/bin/python bench/train.py                 # needs datasets/hm_scale (data.synth + data.prepare)
    .venv/bin/python bench/train.py --data small    # quicker, smaller vocabularies

Goals: trainer >= 10x the notebook way; stream-fed >= 0.8x in-memory.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from hydra import compose, initialize_config_dir  # noqa: E402

import trainer.config  # noqa: E402,F401
from trainer.train import Trainer  # noqa: E402


SAME_AS_NOTEBOOK = ["model=mf", "loss=in_batch", "loss.cross_rank=false"]


def make_trainer(data: str, batch: int, extra: list[str]) -> Trainer:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"data={data}", *extra, "model.id_dim=32", "model.feature_dim=16", "model.output_dim=32",
            f"trainer.batch_size={batch}", "trainer.progress=false", "sharding.print_plan=false",
            "trainer.validate=false", "trainer.resume=false", f"paths.datasets={ROOT}/datasets",
            "trainer.log_every=1000000", "run_dir=" + tempfile.mkdtemp()])
    t = Trainer(cfg, cfg.run_dir, tensorboard=False)
    t.stream.set_epoch(0)
    t.step = 1  # past the first step's statistics, as in a run between log lines
    return t


def trainer_rates(data: str, steps: int, warmup: int, batch: int, extra: list[str]) -> dict[str, float]:
    """Examples/s of unpipelined steps fed by the stream, of the same steps over batches held in
    memory, and of TrainPipelineSparseDist steps fed by the stream."""
    t = make_trainer(data, batch, [*extra, "trainer.pipeline=off"])
    it = iter(t.loader)
    for _ in range(warmup):
        t.train_step(next(it), with_stats=False)
    t0 = time.perf_counter()
    for _ in range(steps):
        t.train_step(next(it), with_stats=False)
    streamed = steps * batch / (time.perf_counter() - t0)
    held = [next(it) for _ in range(steps)]
    t0 = time.perf_counter()
    for b in held:
        t.train_step(b, with_stats=False)
    in_memory = steps * batch / (time.perf_counter() - t0)
    del t, it, held
    p = make_trainer(data, batch, [*extra, "trainer.pipeline=on"])
    gen = p._steps()
    for _ in range(warmup):
        next(gen)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(gen)
    pipelined = steps * batch / (time.perf_counter() - t0)
    return {"streamed": streamed, "in_memory": in_memory, "pipelined": pipelined}


class NotebookTwoTower(torch.nn.Module):
    def __init__(self, n_customers: int, n_articles: int, dim: int):
        super().__init__()
        self.customer = torch.nn.Embedding(n_customers, dim)
        self.article = torch.nn.Embedding(n_articles, dim)

    def forward(self, c, a):
        return (torch.nn.functional.normalize(self.customer(c), dim=-1),
                torch.nn.functional.normalize(self.article(a), dim=-1))


def notebook_rate(data: str, steps: int, batch: int) -> float:
    from stream import NotebookDataset  # bench/stream.py: the same per-row, dict-based dataset

    ds = NotebookDataset(str(ROOT / "datasets" / data), n_rows=batch * (steps + 2))
    model = NotebookTwoTower(len(ds.cust_index) + 1, len(ds.art_index) + 1, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True)
    it = iter(loader)
    b = next(it)  # warm-up
    t0 = time.perf_counter()
    n = 0
    for _ in range(steps):
        b = next(it)
        q, i = model(b["customer"], b["article"])
        loss = torch.nn.functional.cross_entropy(q @ i.T / 0.05, torch.arange(len(q)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(q)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="hm_scale")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--notebook-steps", type=int, default=5)
    args = ap.parse_args()
    rates = {"same model and loss as the notebook": trainer_rates(args.data, args.steps, args.warmup, args.batch,
                                                                   SAME_AS_NOTEBOOK),
             "default model and loss": trainer_rates(args.data, args.steps, args.warmup, args.batch, [])}
    notebook = notebook_rate(args.data, args.notebook_steps, args.batch)
    print(f"data={args.data}, batch {args.batch}, dim 32, {torch.get_num_threads()} threads, one process; "
          f"examples/s (x notebook)")
    print(f"{'trainer':<36} {'stream-fed':>18} {'in-memory':>18} {'stream/in-mem':>14} {'pipelined, stream':>20}")
    for name, r in rates.items():
        print(f"{name:<36} {r['streamed']:>10,.0f} ({r['streamed'] / notebook:>4.1f}x) "
              f"{r['in_memory']:>10,.0f} ({r['in_memory'] / notebook:>4.1f}x) {r['streamed'] / r['in_memory']:>14.2f} "
              f"{r['pipelined']:>12,.0f} ({r['pipelined'] / notebook:>4.1f}x)")
    print(f"{'notebook way (MF, in-batch softmax)':<36} {notebook:>10,.0f} ( 1.0x)")


if __name__ == "__main__":
    main()
