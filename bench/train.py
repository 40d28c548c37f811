"""Training throughput, measured side by side in one run (examples/s, median of interleaved rounds):

  * stream-fed: the trainer's own steps fed by data.stream, as in a real run;
  * in-memory:  the same steps over batches already in host memory: the stream's cost is the gap;
  * pipelined:  the same, through TorchRec's TrainPipelineSparseDist;
  * notebook way (CPU only): a per-row Dataset over raw transactions with Python-dict id lookups, dense
    nn.Embedding tables updated by Adam, in-batch softmax.

The trainer runs with the notebook's model and loss (id embeddings only, in-batch softmax:
``model=mf loss=in_batch``), so the ratio compares the machinery on the same work, and with the default
model and loss (features, history bag, MLP towers, logQ, masking, 1,024 mixed negatives).
On CUDA it also prints the GPU's mean utilisation and memory during each way (sampled by nvidia-smi),
and ``--profile DIR`` writes a torch.profiler trace of the stream-fed default steps with a summary table.

    .venv/bin/python bench/train.py                            # needs datasets/hm_scale (synth + prepare)
    .venv/bin/python bench/train.py --data small --batch 1024
    python bench/train.py --device cuda --batch 16384 --profile /tmp/prof    # on a GPU machine
    python bench/train.py --device cuda --configs default hard_negatives hard_query
    python bench/train.py --device cuda --batch 16384 --configs default bag bf16 hard_negatives --compile both

Goals: CPU: the default >= 4x the notebook way at batch 1024 on small and 2048 at hm_scale; stream-fed >= 0.9x
in-memory. CUDA (H100, default model): >= 3M examples/s stream-fed, >= 0.9x in-memory, with mined hard
negatives >= 0.5x the default ("x default" column: stream-fed rates over the default's).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from hydra import compose, initialize_config_dir  # noqa: E402

import trainer.config  # noqa: E402,F401
from trainer.model.negatives import StepAt  # noqa: E402
from trainer.train import Trainer  # noqa: E402

CONFIGS = {
    "notebook's model and loss": ["model=mf", "loss=in_batch", "loss.cross_rank=false"],
    "default": [],
    "default, no sales bonus": ["model.recent_sales_buckets=0"],
    "default, no repeat bonus": ["model.repeat_positions=0"],
    "hard negatives (positive)": ["loss=hard_negatives", "loss.hard_every=100000"],
    "hard negatives (query)": ["loss=hard_negatives", "loss.hard_every=100000", "loss.hard_anchor=query"],
    "default, bag history": ["model.history_encoder=bag"],
    "default, tf32": ["trainer.precision=tf32"],
    "default, bf16": ["trainer.precision=bf16"],
}
SHORT = {"notebook": "notebook's model and loss", "default": "default", "hard_negatives": "hard negatives (positive)",
         "hard_query": "hard negatives (query)", "no_sales": "default, no sales bonus",
         "no_repeat": "default, no repeat bonus", "bag": "default, bag history",
         "tf32": "default, tf32", "bf16": "default, bf16"}


def make_trainer(data: str, batch: int, extra: list[str], device: str) -> Trainer:
    run_dir = tempfile.mkdtemp(prefix="bench-train-")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"data={data}", *extra, "model.id_dim=32", "model.feature_dim=16", "model.output_dim=32",
            f"trainer.global_batch_size={batch}", "trainer.progress=false", "sharding.print_plan=false",
            "trainer.validate=false", "trainer.resume=false", f"paths.datasets={ROOT}/datasets",
            f"trainer.device={device}", f"trainer.num_workers={os.environ.get('BENCH_WORKERS', 1)}",
            "trainer.log_every=1000000", f"run_dir={run_dir}"])
    t = Trainer(cfg, run_dir, tensorboard=False)
    t.stream.set_epoch(0)
    for component in t.parts.components:  # the miner's first refresh; no stats, as between log lines
        component.before_step(StepAt(0, 0, 0, epoch_start=True, logging=False))
    return t


class Feed:
    """What Steps.run reads: an iterator of batches (the stream's, or batches held in memory)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def state_dict(self) -> dict:
        return {}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class TrainerRuns:
    """One configuration measured three ways (see the module docstring)."""

    def __init__(self, data: str, batch: int, extra: list[str], device: str, pipelined: bool):
        self.batch, self.device = batch, device
        self.plain = make_trainer(data, batch, [*extra, "trainer.pipeline=off"], device)
        self.stream = iter(self.plain.loader)  # one pass over the stream, shared by both ways
        self.plain_steps = self.plain.steps.run(Feed(self.stream))
        self.step = 0
        self.phase_steps = 0  # at least this many steps per phase (set from --phase-seconds)
        pipelined = pipelined and not any(x.startswith("loss=hard") for x in extra)  # never pipelined
        self.piped = make_trainer(data, batch, [*extra, "trainer.pipeline=on"], device) if pipelined else None
        self.piped_steps = self.piped.steps.run(self.piped.loader) if pipelined else None

    def _run(self, trainer: Trainer, steps, n: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            _, _, _, pos = next(steps)
            self.step += 1
            trainer.task.after_step(pos, self.step)
        sync(self.device)
        return n * self.batch / (time.perf_counter() - t0)

    def close(self) -> None:
        """Stops the step runners and the loaders' worker processes (left running, exit would hang)."""
        for gen in (self.plain_steps, self.piped_steps, self.stream):
            if gen is not None:
                gen.close()

    def warm_up(self, n: int) -> float:
        """Runs n steps each way; returns the stream-fed rate (examples/s) of a second, timed pass."""
        self._run(self.plain, self.plain_steps, n)
        if self.piped is not None:
            self._run(self.piped, self.piped_steps, n)
        return self._run(self.plain, self.plain_steps, n)

    def round(self, n: int, gpu: "GpuSampler | None") -> dict[str, float]:
        n = max(n, self.phase_steps)
        out = {"steps": n}
        with Phase(gpu, out, "streamed"):
            out["streamed"] = self._run(self.plain, self.plain_steps, n)
        held = [next(self.stream) for _ in range(n)]
        time.sleep(1.0)  # let the stream's read-ahead threads settle, so they don't slow the in-memory steps
        with Phase(gpu, out, "in_memory"):
            out["in_memory"] = self._run(self.plain, self.plain.steps.run(Feed(held)), n)
        if self.piped is not None:
            with Phase(gpu, out, "pipelined"):
                out["pipelined"] = self._run(self.piped, self.piped_steps, n)
        return out


class GpuSampler:
    """nvidia-smi's utilisation and memory every 100 ms, in a background thread."""

    def __init__(self):
        self.samples: list[tuple[float, float, float]] = []
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits", "-lms", "100"],
                                     stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.perf_counter(), util, mem))

    def window(self, t0: float, t1: float) -> tuple[float, float]:
        inside = [(u, m) for t, u, m in self.samples if t0 <= t <= t1]
        if not inside:
            return float("nan"), float("nan")
        return float(np.mean([u for u, _ in inside])), float(max(m for _, m in inside))

    def close(self) -> None:
        self.proc.terminate()


class Phase:
    def __init__(self, gpu: GpuSampler | None, out: dict, name: str):
        self.gpu, self.out, self.name = gpu, out, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.gpu is not None:
            torch.cuda.reset_peak_memory_stats()

    def __exit__(self, *exc):
        if self.gpu is not None:
            util, mem = self.gpu.window(self.t0, time.perf_counter())
            self.out[f"{self.name}_util"] = util
            self.out[f"{self.name}_smi_mb"] = mem
            self.out[f"{self.name}_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20


def profile(runs: TrainerRuns, out_dir: str, steps: int) -> None:
    from torch.profiler import ProfilerActivity, schedule
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runs.device == "cuda" else [])
    os.makedirs(out_dir, exist_ok=True)
    with torch_profile(activities=activities, schedule=schedule(wait=1, warmup=2, active=steps),
                       record_shapes=False) as prof:
        for _ in range(steps + 3):
            runs._run(runs.plain, runs.plain_steps, 1)
            prof.step()
    prof.export_chrome_trace(os.path.join(out_dir, "trace.json"))
    sort = "self_cuda_time_total" if runs.device == "cuda" else "self_cpu_time_total"
    for key in dict.fromkeys(("self_cpu_time_total", sort)):
        table = prof.key_averages().table(sort_by=key, row_limit=30)
        with open(os.path.join(out_dir, f"top_{key}.txt"), "w") as f:
            f.write(table)
        print(f"--- profile, {steps} stream-fed steps ({os.path.basename(out_dir)}), by {key} ---\n{table}")


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
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=20, help="trainer steps per round and way")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--configs", nargs="+", default=["notebook", "default"], choices=sorted(SHORT))
    ap.add_argument("--no-pipelined", action="store_true", help="skip the pipelined way")
    ap.add_argument("--notebook-steps", type=int, default=4, help="notebook steps per round (CPU only)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are printed")
    ap.add_argument("--phase-seconds", type=float, default=None,
                    help="run each way for about this long (more steps than --steps when fast), so the GPU "
                         "sampler sees the steady state; default 5 on CUDA, 0 on the CPU")
    ap.add_argument("--profile", default=None, help="write a torch.profiler trace of the default steps here")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off", "both"],
                    help="trainer.compile for every configuration; both: each one eager and compiled, side by side")
    args = ap.parse_args()
    ways = [("", "off"), (", compiled", "on")] if args.compile == "both" else [("", args.compile)]
    configs = {SHORT[c] + suffix: TrainerRuns(args.data, args.batch, [*CONFIGS[SHORT[c]], f"trainer.compile={mode}"],
                                              args.device, not args.no_pipelined)
               for c in args.configs for suffix, mode in ways}
    phase_s = args.phase_seconds if args.phase_seconds is not None else (5.0 if args.device == "cuda" else 0.0)
    for c in configs.values():
        rate = c.warm_up(args.warmup)
        c.phase_steps = int(np.ceil(phase_s * rate / args.batch))
    gpu = GpuSampler() if args.device == "cuda" else None
    notebook = NotebookRun(args.data, args.notebook_steps, args.batch, args.rounds) if args.device == "cpu" else None
    rounds: dict[str, list[dict]] = {name: [] for name in configs}
    nb: list[float] = []
    for _ in range(args.rounds):  # interleaved, so a slow spell on a shared machine hits every way
        for name, c in configs.items():
            rounds[name].append(c.round(args.steps, gpu))
        if notebook is not None:
            nb.append(notebook.round(args.notebook_steps))
    med = lambda xs: float(np.median(xs))  # noqa: E731
    nb_rate = med(nb) if nb else float("nan")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"data={args.data}, batch {args.batch}, dim 32, one process on {where}, loader workers "
          f"{os.environ.get('BENCH_WORKERS', 1)}; examples/s, median of {args.rounds} interleaved rounds of "
          f"{args.steps} steps or more" + (f" (about {phase_s:g} s each)" if phase_s else "")
          + (" (x notebook)" if nb else ""))
    ways = ["streamed", "in_memory"] + ([] if args.no_pipelined else ["pipelined"])
    header = f"{'trainer':<28}" + "".join(f"{w:>22}" for w in ways) + f"{'stream/in-mem':>15}{'x default':>11}"
    if gpu is not None:
        header += "".join(f"{w + ' GPU %':>18}" for w in ways) + f"{'peak GB':>9}"
    print(header)
    base = med([x["streamed"] for x in rounds["default"]]) if "default" in rounds else float("nan")
    for name, rs in rounds.items():
        r = {k: med([x.get(k, float("nan")) for x in rs]) for k in rs[0]}
        r.update({k: float("nan") for w in ways for k in (w, w + "_util", w + "_peak_mb") if k not in r})
        ratio = med([x["streamed"] / x["in_memory"] for x in rs])
        line = f"{name:<28}" + "".join(
            f"{r[w]:>14,.0f}" + (f" ({r[w] / nb_rate:>4.1f}x)" if nb else "       ") for w in ways) + f"{ratio:>15.2f}"
        line += f"{r['streamed'] / base:>11.2f}"
        if gpu is not None:
            line += "".join(f"{r[w + '_util']:>18.0f}" for w in ways)
            line += f"{max(r[w + '_peak_mb'] for w in ways) / 1024:>9.1f}"
        print(line)
    if nb:
        print(f"{'notebook way (MF, in-batch)':<28}{nb_rate:>14,.0f} ( 1.0x)   rounds: " + ", ".join(f"{x:,.0f}" for x in nb))
    if gpu is not None:
        gpu.close()
    if args.profile:
        for name in [n for n in ("default", "default, compiled") if n in configs] or [next(iter(configs))]:
            profile(configs[name], os.path.join(args.profile, name.replace(", ", "_").replace(" ", "_")), 10)
    for c in configs.values():
        c.close()


if __name__ == "__main__":
    main()
