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

import numpy as np
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


class TrainerRuns:
    """One configuration measured three ways: unpipelined steps fed by the stream, the same steps over
    batches already in memory, and TrainPipelineSparseDist steps fed by the stream."""

    def __init__(self, data: str, batch: int, extra: list[str]):
        self.batch = batch
        self.plain = make_trainer(data, batch, [*extra, "trainer.pipeline=off"])
        self.plain_batches = iter(self.plain.loader)
        self.piped = make_trainer(data, batch, [*extra, "trainer.pipeline=on"])
        self.piped_steps = self.piped._steps()

    def warm_up(self, steps: int) -> None:
        for _ in range(steps):
            self.plain.train_step(next(self.plain_batches), with_stats=False)
            next(self.piped_steps)

    def round(self, steps: int) -> dict[str, float]:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.plain.train_step(next(self.plain_batches), with_stats=False)
        streamed = steps * self.batch / (time.perf_counter() - t0)
        held = [next(self.plain_batches) for _ in range(steps)]
        time.sleep(2.0)  # let the stream's read-ahead threads finish, so they don't slow the in-memory steps
        t0 = time.perf_counter()
        for b in held:
            self.plain.train_step(b, with_stats=False)
        in_memory = steps * self.batch / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(steps):
            next(self.piped_steps)
        pipelined = steps * self.batch / (time.perf_counter() - t0)
        return {"streamed": streamed, "in_memory": in_memory, "pipelined": pipelined}


class NotebookTwoTower(torch.nn.Module):
    def __init__(self, n_customers: int, n_articles: int, dim: int):
        super().__init__()
        self.customer = torch.nn.Embedding(n_customers, dim)
        self.article = torch.nn.Embedding(n_articles, dim)

    def forward(self, c, a):
        return (torch.nn.functional.normalize(self.customer(c), dim=-1),
                torch.nn.functional.normalize(self.article(a), dim=-1))


class NotebookRun:
    def __init__(self, data: str, steps: int, batch: int, rounds: int):
        from stream import NotebookDataset  # bench/stream.py: the same per-row, dict-based dataset

        ds = NotebookDataset(str(ROOT / "datasets" / data), n_rows=batch * (rounds * steps + 2))
        self.model = NotebookTwoTower(len(ds.cust_index) + 1, len(ds.art_index) + 1, 32)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.batches = iter(torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True))
        self.step()  # warm-up

    def step(self) -> int:
        b = next(self.batches)
        q, i = self.model(b["customer"], b["article"])
        loss = torch.nn.functional.cross_entropy(q @ i.T / 0.05, torch.arange(len(q)))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return len(q)

    def round(self, steps: int) -> float:
        t0 = time.perf_counter()
        n = sum(self.step() for _ in range(steps))
        return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="hm_scale")
    ap.add_argument("--steps", type=int, default=20, help="trainer steps per round and way")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--notebook-steps", type=int, default=4, help="notebook steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are printed")
    args = ap.parse_args()
    configs = {"same model and loss as the notebook": TrainerRuns(args.data, args.batch, SAME_AS_NOTEBOOK),
               "default model and loss": TrainerRuns(args.data, args.batch, [])}
    for c in configs.values():
        c.warm_up(args.warmup)
    notebook = NotebookRun(args.data, args.notebook_steps, args.batch, args.rounds)
    rounds: dict[str, list[dict]] = {name: [] for name in configs}
    nb: list[float] = []
    for _ in range(args.rounds):  # interleaved, so a slow spell on a shared machine hits every way
        for name, c in configs.items():
            rounds[name].append(c.round(args.steps))
        nb.append(notebook.round(args.notebook_steps))
    med = lambda xs: float(np.median(xs))  # noqa: E731
    nb_rate = med(nb)
    print(f"data={args.data}, batch {args.batch}, dim 32, {torch.get_num_threads()} threads, one process; "
          f"examples/s, median of {args.rounds} interleaved rounds (x notebook)")
    print(f"{'trainer':<36} {'stream-fed':>18} {'in-memory':>18} {'stream/in-mem':>14} {'pipelined, stream':>20}")
    for name, rs in rounds.items():
        r = {k: med([x[k] for x in rs]) for k in rs[0]}
        ratio = med([x["streamed"] / x["in_memory"] for x in rs])
        print(f"{name:<36} {r['streamed']:>10,.0f} ({r['streamed'] / nb_rate:>4.1f}x) "
              f"{r['in_memory']:>10,.0f} ({r['in_memory'] / nb_rate:>4.1f}x) {ratio:>14.2f} "
              f"{r['pipelined']:>12,.0f} ({r['pipelined'] / nb_rate:>4.1f}x)")
    print(f"{'notebook way (MF, in-batch softmax)':<36} {nb_rate:>10,.0f} ( 1.0x)   rounds: "
          + ", ".join(f"{x:,.0f}" for x in nb))


if __name__ == "__main__":
    main()
