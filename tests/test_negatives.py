"""Mined hard negatives against a naive per-row reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.model.negatives import HardNegativeMiner


def naive_candidates(items, anchors, pos, history, lo, hi):
    """Per row: the articles ranked [lo, hi) by inner product with the row's anchor vector (row 0
    never), minus target and history."""
    out = []
    for b in range(len(anchors)):
        scores = items @ anchors[b]
        scores[0] = -np.inf
        ranked = np.argsort(-scores, kind="stable")[:hi][lo:]
        out.append({int(a) for a in ranked if a != pos[b] and a not in history[b]})
    return out


def batch(seed=0, n=400, d=8, b=32):
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(n, d)).astype(np.float32)
    q = rng.normal(size=(b, d)).astype(np.float32)
    pos = rng.integers(1, n, b)
    lengths = rng.integers(0, 8, b)
    values = rng.integers(1, n, int(lengths.sum()))
    history = np.split(values, np.cumsum(lengths)[:-1])
    return items, q, pos, lengths, values, history


@pytest.mark.parametrize("anchor", ["query", "positive"])
def test_mined_negatives_come_from_the_window_and_skip_known_positives(anchor):
    items, q, pos, lengths, values, history = batch()
    m = HardNegativeMiner(4, 5, 40, len(items), items.shape[1], anchor=anchor)
    m.refresh(torch.from_numpy(items))
    args = (torch.from_numpy(q), torch.from_numpy(pos), torch.from_numpy(lengths), torch.from_numpy(values))
    got = m.mine(*args, seed=1, step=3)
    allowed = naive_candidates(items, q if anchor == "query" else items[pos], pos, history, 5, 40)
    assert got.shape == (len(q), 4)
    for row, ok in zip(got.tolist(), allowed):
        assert set(row) <= ok and len(set(row)) == 4
    assert torch.equal(got, m.mine(*args, seed=1, step=3))  # a function of (seed, step, row) and the
    assert not torch.equal(got, m.mine(*args, seed=1, step=4))  # snapshot: resume draws the same


@pytest.mark.parametrize("anchor", ["query", "positive"])
def test_a_rank_mines_its_rows_of_the_global_batch(anchor):
    """Rows [8, 24) of a global batch of 32 mined on their own, as a rank holding them does, get the same
    negatives as in the whole batch mined at once: N ranks draw what one rank draws."""
    items, q, pos, lengths, values, history = batch(seed=5)
    m = HardNegativeMiner(4, 5, 40, len(items), items.shape[1], anchor=anchor)
    m.refresh(torch.from_numpy(items))
    whole = m.mine(torch.from_numpy(q), torch.from_numpy(pos), torch.from_numpy(lengths), torch.from_numpy(values),
                   seed=2, step=7)
    offsets = np.r_[0, np.cumsum(lengths)]
    part = m.mine(torch.from_numpy(q[8:24]), torch.from_numpy(pos[8:24]), torch.from_numpy(lengths[8:24]),
                  torch.from_numpy(values[offsets[8]:offsets[24]]), seed=2, step=7, first_row=8, global_rows=32)
    assert torch.equal(part, whole[8:24])


def test_draws_cover_the_window_evenly():
    """Over many steps a row's negatives spread over its whole usable window, near-uniformly."""
    items, q, pos, lengths, values, history = batch(seed=3, b=1)
    m = HardNegativeMiner(4, 5, 40, len(items), items.shape[1], anchor="query")
    m.refresh(torch.from_numpy(items))
    args = (torch.from_numpy(q), torch.from_numpy(pos), torch.from_numpy(lengths), torch.from_numpy(values))
    drawn = torch.cat([m.mine(*args, seed=0, step=s)[0] for s in range(2000)]).numpy()
    allowed = naive_candidates(items, q, pos, history, 5, 40)[0]
    counts = np.array([(drawn == a).sum() for a in sorted(allowed)])
    assert set(drawn.tolist()) == allowed
    expected = len(drawn) / len(allowed)
    assert counts.min() > 0.7 * expected and counts.max() < 1.3 * expected


def test_a_window_with_too_few_usable_articles_falls_back_to_the_catalogue():
    items, q, pos, lengths, values, _ = batch(seed=4, n=30, b=16)
    m = HardNegativeMiner(3, 0, 4, 30, items.shape[1], anchor="positive")
    m.refresh(torch.from_numpy(items))
    history = np.split(values, np.cumsum(lengths)[:-1])
    window = m.neighbours.numpy()[pos]
    got = m.mine(torch.from_numpy(q), torch.from_numpy(pos), torch.from_numpy(lengths), torch.from_numpy(values),
                 seed=0, step=0).numpy()
    for row, w, p, h in zip(got, window, pos, history):
        usable = [a for a in w if a != p and a not in h]
        assert set(usable) <= set(row) or len(usable) > 3  # every usable one is taken when there are few
        assert ((row >= 1) & (row < 30)).all()


def test_state_round_trip_and_bad_windows():
    m = HardNegativeMiner(2, 0, 10, 50, 4)
    m.refresh(torch.randn(50, 4))
    other = HardNegativeMiner(2, 0, 10, 50, 4)
    other.load_state_dict(m.state_dict())
    assert other.ready and torch.equal(other.embeddings, m.embeddings)
    assert torch.equal(other.neighbours, m.neighbours)  # recomputed from the snapshot
    with pytest.raises(ValueError, match="empty"):
        HardNegativeMiner(2, 10, 10, 50, 4)
    with pytest.raises(ValueError, match="does not fit"):
        HardNegativeMiner(8, 0, 5, 50, 4)
    with pytest.raises(ValueError, match="anchor"):
        HardNegativeMiner(2, 0, 10, 50, 4, anchor="target")


def test_the_miners_refresh_schedule():
    """Every epoch's start (hard_every 0), or every N global steps; an epoch's last step waits for the
    next epoch's start, and a resume mid-epoch refreshes only when its step is due."""
    from trainer.model.negatives import refresh_due

    each_epoch = [(step, bie, start) for step, bie, start in [(0, 0, True), (93, 0, True), (50, 7, True), (8, 8, False)]
                  if refresh_due(0, step, bie, start)]
    assert each_epoch == [(0, 0, True), (93, 0, True)]
    assert [s for s in range(1, 30) if refresh_due(8, s, s % 20, epoch_start=False)] == [8, 16, 24]
    assert not refresh_due(8, 40, 0, epoch_start=False)  # step 40 ends an epoch: ...
    assert refresh_due(8, 40, 0, epoch_start=True)  # ... refreshed as the next one starts
    assert refresh_due(8, 48, 5, epoch_start=True) and not refresh_due(8, 47, 5, epoch_start=True)  # resumes


def test_mined_negatives_refresh_on_their_schedule_as_a_component():
    """The loop calls every component before each step; the mined source refreshes from the item tower only
    when its schedule says, after letting the step runner finish (pause), and checkpoints the miner."""
    from trainer.model.negatives import MinedNegatives, StepAt

    calls = []
    vectors = torch.randn(50, 4)

    def embed(check_stop):
        calls.append(("embed", check_stop))
        return vectors

    source = MinedNegatives(HardNegativeMiner(2, 0, 10, 50, 4), every=8, embed_items=embed,
                            pause=lambda: calls.append(("pause", None)))
    stop = object()
    for step in range(0, 20):
        source.before_step(StepAt(step, 0, step, epoch_start=step == 0, logging=False, check_stop=stop))
    assert calls == [("pause", None), ("embed", stop)] * 3  # steps 0, 8, 16
    assert torch.equal(source.state_dict()["embeddings"], vectors) and source.miner.ready
    again = MinedNegatives(HardNegativeMiner(2, 0, 10, 50, 4), 8, embed, lambda: None)
    again.load_state_dict(source.state_dict())
    assert torch.equal(again.miner.neighbours, source.miner.neighbours)


def test_the_catalogue_as_negatives_is_every_article_once_dealt_over_the_ranks():
    """loss.mixed_negatives=-1: each global batch the whole catalogue but the OOV row (1..N-1), every article
    once, the ranks' shares in rank order making the one-rank list; any other negative count is an error."""
    from trainer.model.negatives import UniformNegatives

    one = UniformNegatives(-1, 10, seed=0)
    assert one.rows == 9 and one(0, 0).tolist() == list(range(1, 10)) == one(3, 7).tolist()
    shares = [UniformNegatives(-1, 10, seed=0, rank=r, world_size=2)(0, 5) for r in range(2)]
    assert np.concatenate(shares).tolist() == list(range(1, 10))
    with pytest.raises(ValueError, match="mixed_negatives=-2"):
        UniformNegatives(-2, 10, seed=0)
