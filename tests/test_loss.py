"""trainer/model/loss.py against a naive per-row, per-candidate reference written with Python loops."""

from __future__ import annotations

import math
import os
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.model.loss import LogQ, Negatives, retrieval_loss


def cfg(**kw):
    base = dict(temperature=0.1, cross_rank=True, mask_accidental_hits=True, kind="softmax", ccl_margin=0.8,
                ccl_negative_weight=1.0, ccl_in_batch=True)
    base.update(kw)
    return SimpleNamespace(**base)


def naive_loss(q, pos, pos_ids, temperature, mask, owner_offset=0, all_pos=None, all_ids=None,
               extra=None, extra_ids=None, hard=None, hard_ids=None, log_q=None, catalog=None):
    """Row by row: build the candidate list with explicit rules, then -log softmax of the positive."""
    all_pos = pos if all_pos is None else all_pos
    all_ids = pos_ids if all_ids is None else all_ids
    n_batch = len(all_ids)
    total = 0.0
    for b in range(len(q)):
        target = owner_offset + b
        logits, tgt_logit = [], None
        for j in range(n_batch):
            z = float(sum(q[b][d] * all_pos[j][d] for d in range(len(q[b])))) / temperature
            if log_q is not None:
                z -= math.log(n_batch * log_q[int(all_ids[j])])
            if j == target:
                tgt_logit = z
            elif mask and int(all_ids[j]) == int(pos_ids[b]):
                continue
            logits.append(z)
        for j in range(0 if extra is None else len(extra)):
            z = float(sum(q[b][d] * extra[j][d] for d in range(len(q[b])))) / temperature
            if log_q is not None:
                z -= math.log(len(extra) / catalog)
            if mask and int(extra_ids[j]) == int(pos_ids[b]):
                continue
            logits.append(z)
        for h in range(0 if hard is None else len(hard[b])):
            if int(hard_ids[b][h]) == int(pos_ids[b]):
                continue
            logits.append(float(sum(q[b][d] * hard[b][h][d] for d in range(len(q[b])))) / temperature)
        mx = max(logits)
        total += -(tgt_logit - mx - math.log(sum(math.exp(z - mx) for z in logits)))
    return total / len(q)


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("mask", [True, False])
def test_in_batch_with_accidental_hits(mask):
    q, p = rand(6, 4, seed=1), rand(6, 4, seed=2)
    ids = torch.tensor([3, 5, 3, 7, 5, 9])  # rows 0/2 and 1/4 share positives
    loss, _ = retrieval_loss(q, p, ids, cfg(mask_accidental_hits=mask))
    ref = naive_loss(q.tolist(), p.tolist(), ids.tolist(), 0.1, mask)
    assert loss.item() == pytest.approx(ref, rel=1e-9)


def test_logq_mixed_and_hard_negatives_and_gradients():
    q = rand(5, 3, seed=3).requires_grad_()
    p = rand(5, 3, seed=4).requires_grad_()
    ids = torch.tensor([1, 2, 2, 4, 6])
    extra, extra_ids = rand(4, 3, seed=5).requires_grad_(), torch.tensor([2, 8, 9, 0])
    hard, hard_ids = rand(5, 2, 3, seed=6).requires_grad_(), torch.tensor([[7, 1], [3, 4], [2, 5], [8, 8], [0, 1]])
    counts = torch.tensor([5, 40, 10, 3, 1, 1, 60, 2, 2, 9], dtype=torch.float64)
    logq = LogQ("static", 10, counts)
    neg = Negatives(extra, extra_ids, hard, hard_ids)
    loss, stats = retrieval_loss(q, p, ids, cfg(), neg, logq, catalog_size=10)
    prob = ((counts + 1) / (counts + 1).sum()).tolist()
    ref = naive_loss(q.tolist(), p.tolist(), ids.tolist(), 0.1, True, extra=extra.tolist(),
                     extra_ids=extra_ids.tolist(), hard=hard.tolist(), hard_ids=hard_ids.tolist(), log_q=prob, catalog=10)
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    assert stats["candidates"] == 5 + 4 + 2
    # The loss logged for people: in-batch softmax only, no logQ, no extra or hard negatives.
    plain = naive_loss(q.tolist(), p.tolist(), ids.tolist(), 0.1, True)
    assert stats["in_batch_loss"].item() == pytest.approx(plain, rel=1e-6)
    assert plain != pytest.approx(ref, rel=1e-3)
    # Gradients against finite differences of the naive reference.
    loss.backward()
    eps = 1e-6
    for tensor, grad in ((q, q.grad), (extra, extra.grad), (hard, hard.grad)):
        flat = tensor.detach().view(-1)
        for k in (0, 4, flat.numel() - 1):
            old = flat[k].item()
            flat[k] = old + eps
            up = naive_loss(q.tolist(), p.tolist(), ids.tolist(), 0.1, True, extra=extra.tolist(),
                            extra_ids=extra_ids.tolist(), hard=hard.tolist(), hard_ids=hard_ids.tolist(),
                            log_q=prob, catalog=10)
            flat[k] = old - eps
            down = naive_loss(q.tolist(), p.tolist(), ids.tolist(), 0.1, True, extra=extra.tolist(),
                              extra_ids=extra_ids.tolist(), hard=hard.tolist(), hard_ids=hard_ids.tolist(),
                              log_q=prob, catalog=10)
            flat[k] = old
            assert grad.view(-1)[k].item() == pytest.approx((up - down) / (2 * eps), abs=1e-5)


def naive_ccl(q, pos, pos_ids, margin, weight, extra=None, extra_ids=None, hard=None, hard_ids=None,
              in_batch=True):
    """SimpleX's cosine contrastive loss row by row: (1 - cos(q, p)) + w x the mean over the row's negatives
    (other rows' positives when ``in_batch``, the extra and the hard ones, none equal to the row's positive)
    of max(0, cos - margin)."""
    def cos(x, y):
        return sum(a * b for a, b in zip(x, y)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))

    total = 0.0
    for b in range(len(q)):
        negs = [pos[j] for j in range(len(pos)) if in_batch and j != b and pos_ids[j] != pos_ids[b]]
        negs += [extra[j] for j in range(len(extra or [])) if extra_ids[j] != pos_ids[b]]
        negs += [hard[b][h] for h in range(len(hard[b]) if hard else 0) if hard_ids[b][h] != pos_ids[b]]
        hinge = [max(0.0, cos(q[b], n) - margin) for n in negs]
        total += (1 - cos(q[b], pos[b])) + weight * (sum(hinge) / max(len(hinge), 1))
    return total / len(q)


def test_cosine_contrastive_loss_against_a_naive_reference():
    """loss.kind=ccl over in-batch, extra and hard negatives, unnormalised inputs (cosines taken inside),
    accidental hits left out of the mean; gradients against finite differences of the reference."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_()
    p = torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_()
    ids = torch.tensor([1, 2, 2, 4, 6])
    extra, extra_ids = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_(), torch.tensor([2, 8, 9, 3])
    hard = torch.randn(5, 2, 3, generator=g, dtype=torch.float64).requires_grad_()
    hard_ids = torch.tensor([[7, 1], [3, 4], [2, 5], [8, 8], [0, 1]])
    c = cfg(kind="ccl", ccl_margin=0.1, ccl_negative_weight=3.0)

    def ref():
        return naive_ccl(q.tolist(), p.tolist(), ids.tolist(), 0.1, 3.0, extra.tolist(), extra_ids.tolist(),
                         hard.tolist(), hard_ids.tolist())
    loss, stats = retrieval_loss(q, p, ids, c, Negatives(extra, extra_ids, hard, hard_ids),
                                 LogQ("static", 10, torch.ones(10)), catalog_size=10)  # logQ: not in ccl
    assert loss.item() == pytest.approx(ref(), rel=1e-9)
    assert stats["candidates"] == 5 + 4 + 2
    assert ref() != pytest.approx(naive_ccl(q.tolist(), p.tolist(), ids.tolist(), 0.5, 3.0, extra.tolist(),
                                            extra_ids.tolist(), hard.tolist(), hard_ids.tolist()), rel=1e-3)
    # without the other rows' positives among the negatives (the default): uniform and mined ones only
    no_batch, _ = retrieval_loss(q, p, ids, cfg(kind="ccl", ccl_margin=0.1, ccl_negative_weight=3.0, ccl_in_batch=False),
                                 Negatives(extra, extra_ids, hard, hard_ids))
    want = naive_ccl(q.tolist(), p.tolist(), ids.tolist(), 0.1, 3.0, extra.tolist(), extra_ids.tolist(),
                     hard.tolist(), hard_ids.tolist(), in_batch=False)
    assert no_batch.item() == pytest.approx(want, rel=1e-9) and want != pytest.approx(ref(), rel=1e-3)
    loss.backward()
    eps = 1e-6
    for tensor, grad in ((q, q.grad), (p, p.grad), (extra, extra.grad), (hard, hard.grad)):
        flat = tensor.detach().view(-1)
        for k in range(flat.numel()):
            old = flat[k].item()
            flat[k] = old + eps
            up = ref()
            flat[k] = old - eps
            down = ref()
            flat[k] = old
            assert grad.view(-1)[k].item() == pytest.approx((up - down) / (2 * eps), abs=1e-6)


def test_streaming_logq_tracks_frequency():
    est = LogQ("streaming", 4, alpha=0.2)
    for step in range(1, 400):
        ids = [0] + ([1] if step % 4 == 0 else []) + ([2] if step % 20 == 0 else [])
        est.update(torch.tensor(ids))
    assert est.log_q(torch.tensor([0])).item() > est.log_q(torch.tensor([1])).item() > \
        est.log_q(torch.tensor([2])).item()


def test_streaming_logq_estimates_the_per_draw_probability():
    """On a stationary stream of batches drawn from a known distribution, the streaming estimate
    converges to the same per-draw probability that ``static`` computes from counts (so that the
    correction log(N_batch * q) means the same in both modes), popular articles drawn several times a
    batch included."""
    rng = np.random.default_rng(0)
    n, batch = 50, 64
    p = 1.0 / np.arange(1, n + 1) ** 1.1
    p /= p.sum()
    est = LogQ("streaming", n, alpha=0.01)
    for _ in range(6000):
        est.update(torch.from_numpy(rng.choice(n, size=batch, p=p)))
    q = est.log_q(torch.arange(n)).exp().numpy()
    assert q[:10] == pytest.approx(p[:10], rel=0.15)  # the top article: ~14 draws in every batch
    assert q[10:] == pytest.approx(p[10:], rel=0.35)  # rarer: noisier, still the same scale


def _cross_rank_worker(rank, world, init_file, q_all, p_all, ids_all, e_all, e_ids, sizes, out):
    from trainer.parallel import distributed as D

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    b = q_all.shape[0] // world
    q = q_all[rank * b:(rank + 1) * b].clone().requires_grad_()
    p = p_all[rank * b:(rank + 1) * b].clone().requires_grad_()
    lo = sum(sizes[:rank])
    e = e_all[lo:lo + sizes[rank]].clone().requires_grad_()  # this rank's share of the uniform negatives
    extra, _ = D.all_gather_with_grad(e, sizes)
    neg = Negatives(extra=extra, extra_ids=D.all_gather_rows(e_ids[lo:lo + sizes[rank]], sizes))
    loss, _ = retrieval_loss(q, p, ids_all[rank * b:(rank + 1) * b], cfg(), neg, group=dist.group.WORLD)
    loss.backward()
    out[rank] = (loss.item(), q.grad.clone(), p.grad.clone(), e.grad.clone())
    dist.destroy_process_group()


def test_cross_rank_loss_and_gradients_are_the_global_batch_s():
    """2 ranks with half a batch each, their uniform negatives split unevenly (2 + 3): the mean of the
    ranks' losses is the loss of one process over the whole batch, and every gradient is that process's
    gradient times the world size (DDP and TorchRec then average over the ranks): each rank's positives and
    negatives get the gradient of every rank's rows, not only their own."""
    world, b, sizes = 2, 4, [2, 3]
    q_all, p_all, e_all = rand(world * b, 3, seed=7), rand(world * b, 3, seed=8), rand(sum(sizes), 3, seed=9)
    ids_all = torch.tensor([1, 2, 3, 4, 2, 6, 7, 1])  # accidental hits across ranks
    e_ids = torch.tensor([9, 2, 10, 11, 6])  # and among the uniform negatives
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_cross_rank_worker, args=(world, os.path.join(tmp, "init"), q_all, p_all, ids_all, e_all, e_ids,
                                           sizes, out), nprocs=world, join=True)
        results = dict(out)
    # The reference: one process, the whole batch, written out row by row and by autograd.
    q, p, e = (t.clone().requires_grad_() for t in (q_all, p_all, e_all))
    ref = naive_loss(q.tolist(), p.tolist(), ids_all.tolist(), 0.1, True, extra=e.tolist(), extra_ids=e_ids.tolist())
    logits = torch.cat([q @ p.T, q @ e.T], dim=1) / 0.1
    hit = torch.cat([ids_all[None, :], e_ids[None, :]], dim=1) == ids_all[:, None]
    hit[torch.arange(world * b), torch.arange(world * b)] = False
    whole = torch.nn.functional.cross_entropy(logits.masked_fill(hit, -1e9), torch.arange(world * b))
    assert whole.item() == pytest.approx(ref, rel=1e-9)
    whole.backward()
    assert np.mean([results[r][0] for r in range(world)]) == pytest.approx(ref, rel=1e-9)
    for r in range(world):
        _, q_grad, p_grad, e_grad = results[r]
        lo = sum(sizes[:r])
        assert torch.allclose(q_grad, world * q.grad[r * b:(r + 1) * b])
        assert torch.allclose(p_grad, world * p.grad[r * b:(r + 1) * b])
        assert torch.allclose(e_grad, world * e.grad[lo:lo + sizes[r]])


def test_in_batch_accuracy_ranks_by_raw_similarity():
    """Hand-worked: the best candidate by dot product, counted right when it is the row's article
    (a duplicate of the positive in another row counts); logQ does not change it."""
    e = torch.eye(3)
    pos = torch.stack([e[0], e[1], e[2], e[0]])
    ids = torch.tensor([10, 11, 12, 10])
    q = torch.stack([e[0], e[2], e[2], e[1]]) * 0.9 + 0.01  # rows 0 and 2 point at their own article
    extra = torch.stack([e[1] * 2.0])  # a mixed negative that outscores article 11 for row 3
    neg = Negatives(extra=extra, extra_ids=torch.tensor([99]))
    counts = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1000, 1, 1] + [1] * 87, dtype=torch.float64)
    for logq in (None, LogQ("static", 100, counts)):
        _, stats = retrieval_loss(q, pos, ids, cfg(cross_rank=False), neg, logq, catalog_size=100)
        assert stats["in_batch_acc"] == pytest.approx(2 / 4)
