"""The run's pictures: valid PNG files whose recorded series match values computed independently."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data.jagged import Jagged
from trainer.evaluation import plots
from trainer.evaluation.metrics import recall_curve


def naive_recall_at(ranked: list[list[int]], truth: list[set], k: int) -> float:
    per_query = [len(set(r[:k]) & t) / len(t) for r, t in zip(ranked, truth) if t]
    return sum(per_query) / len(per_query)


def check_png(path, min_size=(300, 200)) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 5  # something is drawn, not a blank canvas


def test_recall_curve_against_a_naive_count():
    rng = np.random.default_rng(0)
    ranked = np.stack([rng.permutation(30)[:10] for _ in range(40)])
    truth = [set(rng.choice(30, size=rng.integers(0, 4), replace=False).tolist()) for _ in range(40)]
    curve = recall_curve(ranked, Jagged.from_lists([sorted(t) for t in truth]))
    expected = [naive_recall_at(ranked.tolist(), truth, k) for k in range(1, 11)]
    assert curve == pytest.approx(expected, abs=1e-12)
    assert np.all(np.diff(curve) >= 0)


def test_recall_curves_picture(tmp_path):
    curves = {"two-tower": np.array([0.1, 0.2, 0.25]), "popularity": np.array([0.05, 0.07, 0.08])}
    plots.recall_curves(curves, str(tmp_path / "r.png"), "Recall@K")
    check_png(tmp_path / "r.png")
    shown = plots.series_of(str(tmp_path / "r.png"))
    assert list(shown) == ["two-tower", "popularity"]
    assert shown["two-tower"] == {"k": [1, 2, 3], "recall": [0.1, 0.2, 0.25]}
    assert shown["popularity"]["recall"] == [0.05, 0.07, 0.08]


def test_nprobe_picture(tmp_path):
    sweep = [{"nprobe": 1, "recall@12": 0.45, "qps": 3.5e5}, {"nprobe": 4, "recall@12": 0.83, "qps": 3.2e5},
             {"nprobe": 16, "recall@12": 0.98, "qps": 1.9e5}]
    plots.nprobe_curve(sweep, 12, 3.7e4, str(tmp_path / "n.png"), chosen=16)
    check_png(tmp_path / "n.png")
    shown = plots.series_of(str(tmp_path / "n.png"))
    assert shown["nprobe"] == [1, 4, 16] and shown["recall@12"] == [0.45, 0.83, 0.98]
    assert shown["qps"] == [3.5e5, 3.2e5, 1.9e5] and shown["exact_qps"] == 3.7e4


def test_training_picture(tmp_path):
    history = {"train": [{"step": s, "epoch": s // 100, "loss": 7.0 + s / 100, "in_batch_loss": 6.5 - s / 100}
                         for s in range(0, 300, 50)],
               "val": [{"epoch": 0, "step": 100, "recall@12": 0.2}, {"epoch": 1, "step": 200, "recall@12": 0.3}]}
    plots.training_curves(history, str(tmp_path / "t.png"), "recall@12")
    check_png(tmp_path / "t.png")
    shown = plots.series_of(str(tmp_path / "t.png"))
    assert shown["step"] == [0, 50, 100, 150, 200, 250]
    assert shown["in_batch_loss"] == [6.5, 6.0, 5.5, 5.0, 4.5, 4.0]
    assert shown["loss"][0] == 7.0 and shown["epoch"] == [0, 1] and shown["recall@12"] == [0.2, 0.3]
