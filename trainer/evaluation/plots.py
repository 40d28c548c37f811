"""Pictures of a run, as PNG (matplotlib, no display): Recall@K of the model against every baseline,
the index's recall/QPS trade-off over nprobe, training loss and validation recall per epoch.

Each function writes one file and records the plotted series in the PNG's ``Description`` text chunk
(JSON), so a reader (or a test) can check what a picture shows without looking at it.
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from data.io import atomic_open, fs_and_path  # noqa: E402


def _save(fig, url: str, series: dict) -> dict:
    with atomic_open(url, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight",
                    metadata={"Description": json.dumps(series, separators=(",", ":"))})
    plt.close(fig)
    return series


def series_of(url: str) -> dict:
    """The series a picture written here shows (read back from its PNG text chunk)."""
    from PIL import Image

    fs, path = fs_and_path(url)
    with fs.open(path, "rb") as f, Image.open(f) as img:
        img.load()
        return json.loads(img.text["Description"])


def recall_curves(curves: dict[str, np.ndarray], url: str, title: str) -> dict:
    """Recall@K for K = 1..len(curve), one line per method (the first one, the model, drawn bold)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for i, (name, curve) in enumerate(curves.items()):
        ks = np.arange(1, len(curve) + 1)
        ax.plot(ks, curve, marker="o", markersize=3, linewidth=2.5 if i == 0 else 1.2, label=name)
        series[name] = {"k": ks.tolist(), "recall": [round(float(v), 6) for v in curve]}
    ax.set(xlabel="K", ylabel="Recall@K", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, url, series)


def nprobe_curve(sweep: list[dict], k: int, exact_qps: float, url: str, chosen: int | None = None) -> dict:
    """Recall@k against exact search (left axis) and queries per second (right, log) per nprobe."""
    nprobe = [r["nprobe"] for r in sweep]
    recall = [r[f"recall@{k}"] for r in sweep]
    qps = [r["qps"] for r in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(nprobe, recall, marker="o", color="tab:blue", label=f"recall@{k} vs exact")
    ax.set(xscale="log", xlabel="nprobe", ylabel=f"recall@{k} vs exact search", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.plot(nprobe, qps, marker="s", color="tab:orange", label="QPS")
    right.axhline(exact_qps, color="tab:gray", linestyle="--", label="exact search QPS")
    right.set(yscale="log", ylabel="queries per second")
    if chosen is not None:
        ax.axvline(chosen, color="tab:green", linestyle=":", label=f"chosen nprobe {chosen}")
    lines = ax.get_legend_handles_labels(), right.get_legend_handles_labels()
    ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8, loc="center right")
    ax.set_title("IVF index: recall and speed per nprobe")
    return _save(fig, url, {"nprobe": nprobe, f"recall@{k}": recall, "qps": qps, "exact_qps": exact_qps})


def training_curves(history: dict, url: str, metric: str) -> dict:
    """Left: the logged training losses per step (the plain in-batch loss and the objective), epochs
    marked; right: the validation metric per epoch."""
    train, val = history.get("train", []), history.get("val", [])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [t["step"] for t in train]
    series: dict = {"step": steps}
    for key, label in (("in_batch_loss", "in-batch loss (no logQ)"), ("loss", "objective (with logQ)")):
        values = [t.get(key) for t in train]
        if any(v is not None for v in values):
            left.plot(steps, [np.nan if v is None else v for v in values], label=label)
            series[key] = values
    for t0, t1 in zip(train, train[1:]):
        if t1.get("epoch", 0) != t0.get("epoch", 0):
            left.axvline(t1["step"], color="tab:gray", alpha=0.3)
    left.set(xlabel="step", ylabel="loss", title="training loss (grey lines: epochs)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    epochs = [v["epoch"] for v in val]
    values = [v.get(metric) for v in val]
    right.plot(epochs, values, marker="o", color="tab:green")
    right.set(xlabel="epoch", ylabel=metric, title=f"validation {metric}")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.grid(alpha=0.3)
    series.update({"epoch": epochs, metric: values})
    return _save(fig, url, series)
