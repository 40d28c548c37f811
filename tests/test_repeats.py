"""Buying again (trainer/model/repeats.py, trainer/retrieval/rerank.py): the repeat bonus in the loss and at
scoring, against naive per-row references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from data.jagged import Jagged
from trainer.model.inputs import recent_articles
from trainer.model.repeats import (
    RepeatTerm,
    _dense_bonus,
    add_bonus,
    logit_bonus,
    mix_recent,
)
from trainer.model.sales import SalesTerm
from trainer.retrieval.rerank import boost_recent, newest_first


def naive_position(history: list[int], item: int, positions: int) -> int | None:
    """The item's position in the history, newest first (0: the last bought), within ``positions``."""
    for p, h in enumerate(reversed(history[-positions:])):
        if h == item and h > 0:
            return p
    return None


def naive_scores(scores: np.ndarray, history: list[int], bonus, level=None, t=None) -> np.ndarray:
    """One row's scores with its recent articles rescored: plus bonus[p], or with a level the mixture
    T * logaddexp(s / T, (bonus[p] + level) / T)."""
    full = scores.copy()
    for item in range(1, len(full)):
        p = naive_position(history, item, len(bonus))
        if p is not None:
            full[item] = (full[item] + bonus[p] if level is None
                          else t * np.logaddexp(full[item] / t, (bonus[p] + level) / t))
    return full


def test_newest_first_by_hand():
    offsets = np.array([0, 3, 3, 8])
    values = np.array([5, 6, 7, 1, 2, 1, 0, 3])
    assert newest_first(Jagged(offsets, values), 4).tolist() == [[7, 6, 5, -1], [-1, -1, -1, -1], [3, -1, 1, 2]]
    # row 2: 3 newest, then the OOV 0 (no article), then 1, then 2; the older 1 is a repeat of a newer one


def test_logit_bonus_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    b, r, c, h = 6, 4, 15, 3
    recent = torch.from_numpy(rng.integers(0, 6, (b, r)))
    shared = torch.from_numpy(rng.integers(1, 6, c))
    hard = torch.from_numpy(rng.integers(1, 6, (b, h)))
    bias = torch.tensor([3.0, 2.0, 1.0, 0.5])
    got_shared, got_hard = logit_bonus(recent, shared, bias), logit_bonus(recent, hard, bias)
    for row in range(b):
        hist = list(reversed(recent[row].tolist()))  # oldest first, as naive_position reads it
        for j in range(c):
            p = naive_position(hist, int(shared[j]), r)
            assert got_shared[row, j].item() == (0.0 if p is None else bias[p].item())
        for j in range(h):
            p = naive_position(hist, int(hard[row, j]), r)
            assert got_hard[row, j].item() == (0.0 if p is None else bias[p].item())


def test_the_sparse_join_equals_the_dense_comparison_with_gradients():
    """Shared candidates on the CPU go through the sparse join; the GPU's dense path is the reference."""
    torch.manual_seed(0)
    recent = torch.randint(0, 40, (64, 6))
    recent[3] = torch.tensor([5, 5, 7, 5, 0, 7])  # repeats: the newest position counts
    ids = torch.randint(1, 40, (300,))  # with many duplicate columns
    bias = torch.randn(6, requires_grad=True)
    logits = torch.randn(64, 300)
    sparse = add_bonus(logits.clone(), recent, ids, bias)
    dense = logits + _dense_bonus(recent, ids, bias)
    assert torch.allclose(sparse, dense)
    g = torch.randn(64, 300)
    gs, = torch.autograd.grad((sparse * g).sum(), bias)
    gd, = torch.autograd.grad((dense * g).sum(), bias)
    assert torch.allclose(gs, gd, atol=1e-4)


def test_mix_recent_matches_a_naive_loop_on_both_paths_with_gradients():
    """Shared candidates (CPU: the sparse join) and per-row candidates (the dense comparison) against a
    loop: a candidate that is the row's p-th newest distinct article gets logaddexp(logit, level + shift)."""
    rng = np.random.default_rng(4)
    b, r, c, h = 7, 4, 20, 3
    recent = torch.from_numpy(rng.integers(0, 8, (b, r)))
    recent[0] = torch.tensor([5, 5, 0, 6])  # a repeat (the newer position counts) and the OOV id
    shared = torch.from_numpy(rng.integers(1, 8, c))
    hard = torch.from_numpy(rng.integers(1, 8, (b, h)))
    level = torch.from_numpy(rng.normal(size=(b, r))).float().requires_grad_()
    shift = torch.from_numpy(rng.normal(size=c)).float()
    logits_s, logits_h = torch.randn(b, c), torch.randn(b, h)
    got_s = mix_recent(logits_s, recent, shared, level, shift)
    got_h = mix_recent(logits_h, recent, hard, level)
    dense_s = mix_recent(logits_s, recent, shared.expand(b, c), level, shift)  # the dense path on the same
    for row in range(b):
        hist = list(reversed(recent[row].tolist()))
        for j in range(c):
            p = naive_position(hist, int(shared[j]), r)
            want = logits_s[row, j] if p is None else torch.logaddexp(logits_s[row, j], level[row, p] + shift[j])
            assert got_s[row, j].item() == pytest.approx(want.item(), abs=1e-6)
        for j in range(h):
            p = naive_position(hist, int(hard[row, j]), r)
            want = logits_h[row, j] if p is None else torch.logaddexp(logits_h[row, j], level[row, p])
            assert got_h[row, j].item() == pytest.approx(want.item(), abs=1e-6)
    g = torch.randn(b, c)
    gs, = torch.autograd.grad((got_s * g).sum(), level)
    gd, = torch.autograd.grad((dense_s * g).sum(), level)
    assert gs.abs().sum() > 0 and torch.allclose(gs, gd, atol=1e-5)


def test_recent_articles_from_the_bag_and_from_positions():
    # 2 query rows (histories [4, 5, 6] and [7]) and 1 item-only row (empty history)
    bag = KeyedJaggedTensor(keys=["history"], values=torch.tensor([4, 5, 6, 7]), lengths=torch.tensor([3, 1, 0]))
    assert recent_articles(bag, 2, 2).tolist() == [[6, 5], [7, 0]]
    pos = KeyedJaggedTensor(keys=["hist_0", "hist_1"], values=torch.tensor([6, 7, 5, 0]),
                            lengths=torch.tensor([1, 1, 0, 1, 1, 0]))
    assert recent_articles(pos, 2, 3).tolist() == [[6, 5, 0], [7, 0, 0]]


def test_boost_recent_equals_ranking_every_article_with_the_bonus():
    rng = np.random.default_rng(1)
    n, n_items, d, k = 40, 60, 6, 5
    items = rng.normal(size=(n_items, d)).astype(np.float32)
    q = rng.normal(size=(n, d)).astype(np.float32)
    lengths = rng.integers(0, 7, n)
    offsets = np.r_[0, np.cumsum(lengths)]
    values = rng.integers(0, n_items, offsets[-1])
    bonus = np.array([2.0, 1.0, 0.5, 0.25], np.float32)
    scores = q @ items.T
    scores[:, 0] = -np.inf  # the OOV row
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k + len(bonus)]
    got = boost_recent(ranked, q, items, Jagged(offsets, values), bonus, k)
    for row in range(n):
        full = naive_scores(scores[row], values[offsets[row]:offsets[row + 1]].tolist(), bonus)
        want = np.argsort(-full, kind="stable")[:k]
        assert np.allclose(np.sort(full[got[row]]), np.sort(full[want])), row


def test_boost_recent_with_a_level_equals_ranking_every_article_by_the_mixture():
    """With a per-query level, a recent article scores T * logaddexp(s / T, (bonus[p] + level) / T)."""
    rng = np.random.default_rng(5)
    n, n_items, d, k, t = 30, 50, 6, 5, 0.2
    items = rng.normal(size=(n_items, d)).astype(np.float32)
    q = rng.normal(size=(n, d)).astype(np.float32)
    lengths = rng.integers(0, 7, n)
    offsets = np.r_[0, np.cumsum(lengths)]
    values = rng.integers(0, n_items, offsets[-1])
    bonus = np.array([1.0, 0.5, 0.0], np.float32)
    level = rng.normal(size=n).astype(np.float32) * 2
    scores = q @ items.T
    scores[:, 0] = -np.inf
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k + len(bonus)]
    got = boost_recent(ranked, q, items, Jagged(offsets, values), bonus, k, level, t)
    changed = 0
    for row in range(n):
        full = naive_scores(scores[row], values[offsets[row]:offsets[row + 1]].tolist(), bonus, level[row], t)
        want = np.argsort(-full, kind="stable")[:k]
        assert np.allclose(np.sort(full[got[row]]), np.sort(full[want]), atol=1e-5), row
        changed += set(want) != set(ranked[row, :k])
    assert changed > 0  # the mixture moved some rankings


def test_the_loss_mixes_recent_articles_under_the_logq_correction():
    """In-batch logits minus log(N q_j); a recent candidate's becomes logaddexp(s/T, level) - log(N q_j)."""
    from types import SimpleNamespace

    from trainer.model.loss import LogQ, retrieval_loss

    rng = np.random.default_rng(6)
    b, d, t, n_items = 5, 4, 0.5, 10
    q, pos = (torch.from_numpy(rng.normal(size=(b, d)).astype(np.float32)) for _ in range(2))
    ids = torch.tensor([3, 4, 5, 6, 7])
    recent = torch.tensor([[4, 3, 0], [5, 0, 0], [0, 0, 0], [6, 5, 1], [7, 2, 0]])
    level = torch.from_numpy(rng.normal(size=(b, 3)).astype(np.float32))
    counts = torch.arange(1, n_items + 1, dtype=torch.float64)
    logq = LogQ("static", n_items, counts)
    cfg = SimpleNamespace(temperature=t, cross_rank=False, mask_accidental_hits=False, kind="softmax")
    got, _ = retrieval_loss(q, pos, ids, cfg, None, logq, with_stats=False,
                            bonus=lambda logits, c, shift: mix_recent(logits, recent, c, level, shift))
    log_q = np.log((counts.numpy() + 1) / (counts.numpy() + 1).sum())
    total = 0.0
    for r in range(b):
        hist = list(reversed(recent[r].tolist()))
        logits = []
        for j in range(b):
            item = int(ids[j])
            x = float(q[r] @ pos[j]) / t
            p = naive_position(hist, item, 3)
            if p is not None:
                x = float(np.logaddexp(x, float(level[r, p])))
            logits.append(x - np.log(b) - log_q[item])
        logits = torch.tensor(logits, dtype=torch.float64)
        total += float(torch.logsumexp(logits, 0) - logits[r])
    assert got.item() == pytest.approx(total / b, rel=1e-5)


def test_the_loss_adds_the_bonus_to_in_batch_and_hard_logits():
    from types import SimpleNamespace

    from trainer.model.loss import Negatives, retrieval_loss

    rng = np.random.default_rng(2)
    b, d, h, t = 5, 4, 2, 0.5
    q, pos = torch.from_numpy(rng.normal(size=(b, d)).astype(np.float32)), torch.from_numpy(
        rng.normal(size=(b, d)).astype(np.float32))
    ids = torch.tensor([3, 4, 5, 6, 7])
    hard = torch.from_numpy(rng.normal(size=(b, h, d)).astype(np.float32))
    hard_ids = torch.tensor([[4, 9], [3, 8], [9, 9], [5, 1], [2, 2]])
    recent = torch.tensor([[4, 3, 0], [5, 0, 0], [0, 0, 0], [6, 5, 1], [7, 2, 0]])
    bias = torch.tensor([1.5, 0.7, 0.2])
    cfg = SimpleNamespace(temperature=t, cross_rank=False, mask_accidental_hits=False, kind="softmax")
    got, _ = retrieval_loss(q, pos, ids, cfg, Negatives(hard=hard, hard_ids=hard_ids), None, with_stats=False,
                            bonus=lambda logits, c, shift: add_bonus(logits, recent, c, bias))
    total = 0.0
    for r in range(b):  # naive: every candidate's logit plus the bonus of its position in the row's history
        hist = [x for x in reversed(recent[r].tolist())]
        cands = [(pos[j], int(ids[j])) for j in range(b)] + [(hard[r, j], int(hard_ids[r, j])) for j in range(h)]
        logits = []
        for vec, item in cands:
            p = naive_position(hist, item, 3)
            logits.append(float(q[r] @ vec) / t + (0.0 if p is None else float(bias[p])))
        logits = torch.tensor(logits)
        total += float(torch.logsumexp(logits, 0) - logits[r])
    assert got.item() == pytest.approx(total / b, rel=1e-5)


def test_the_scoring_level_reads_the_towers_columns_and_the_catalogue_mean():
    """Embedder.repeat_level: head(query) + <query, mean article>, over the towers' columns only (not the
    recent-sales column scoring vectors carry) and the articles without the OOV row 0; by hand."""
    from trainer.retrieval.embedder import Embedder

    rng = np.random.default_rng(7)
    d = 4
    term = RepeatTerm(3, d, mixture=True)
    head = torch.nn.Linear(d, 1)  # a one-layer head, so the reference is written by hand
    term.level = head
    emb = Embedder.__new__(Embedder)
    emb.device, emb.repeats = torch.device("cpu"), term
    emb.columns = [SalesTerm(4)]  # with recent sales: the scoring vectors have D + 1 columns
    q = torch.from_numpy(np.c_[rng.normal(size=(6, d)), np.ones(6)].astype(np.float32))
    items = torch.from_numpy(rng.normal(size=(9, d + 1)).astype(np.float32))
    items[0] = 100.0  # the OOV row must not count
    w, b = head.weight.detach().numpy()[0], head.bias.item()
    qn, it = q.numpy()[:, :d], items.numpy()[1:, :d]
    want = qn @ w + b + qn @ it.mean(0)
    assert np.allclose(emb.repeat_level(q, items), want, atol=1e-5)
    emb.repeats = RepeatTerm(3, d, mixture=False)  # the bonus form: no level
    assert emb.repeat_level(q, items) is None


def test_a_run_saved_before_the_mixture_keeps_the_bonus():
    """A checkpoint's recorded config without model.repeat_mode was trained with the bonus (no level
    head): typing it again must not give it the new default's head, which its weights lack."""
    from omegaconf import OmegaConf

    from trainer.config import TrainJob
    from trainer.loop.runs import typed

    saved = OmegaConf.to_container(OmegaConf.structured(TrainJob))
    assert typed(saved).model.repeat_mode == "mixture"
    del saved["model"]["repeat_mode"]
    assert typed(saved).model.repeat_mode == "bonus"
