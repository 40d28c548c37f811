"""Scoring a customer's own recent articles apart from the inner product (buying again, trainer/model/repeats.py):
the numpy side the Retriever and the serving bundle share. Imports numpy only (and the jagged type)."""

from __future__ import annotations

import numpy as np

from data.jagged import Jagged


def padded(history: Jagged, width: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, width) each row's last entries (``history`` holds them oldest first), newest first, ``pad`` past a
    row's history, and how many are real: the one way a customer's history is read newest first on the host
    (the query tower's input, buying again's positions)."""
    lengths = np.minimum(history.lengths(), width)
    p = np.arange(width)
    at = history.offsets[1:, None] - 1 - p[None, :]
    values = np.r_[np.asarray(history.values, np.int64), pad]
    out = np.where(p[None, :] < lengths[:, None], values[np.clip(at, 0, len(values) - 1)], pad)
    return out.astype(np.int64), lengths.astype(np.int64)


def newest_first(history: Jagged, positions: int) -> np.ndarray:
    """(n, positions) the last articles of each row (oldest first in ``history``), newest first, -1 past a
    row's history; a repeat of a newer position is -1 too."""
    n = len(history)
    out, _ = padded(history, positions, pad=-1)
    out[out <= 0] = -1  # the OOV article is no article
    dup = (out[:, :, None] == out[:, None, :]) & np.tri(positions, k=-1, dtype=bool)[None]
    out[dup.any(2)] = -1
    return out.reshape(n, positions)


def boost_recent(ranked: np.ndarray, queries: np.ndarray, items: np.ndarray, history: Jagged,
                 bonus: np.ndarray, k: int, level: np.ndarray | None = None,
                 temperature: float | None = None) -> np.ndarray:
    """The best k of each row once its last articles carry their bonus (with ``level``, (n,) each row's
    level: the mixture at ``temperature``). ``ranked``: (n, W) article rows by inner product (-1: none),
    W >= k + len(bonus) for an exact answer; ``items`` indexed by article row; ``history``: each row's
    articles, oldest first."""
    recent = newest_first(history, len(bonus))
    valid = recent >= 0
    r_items = items[np.clip(recent, 0, None)]
    r_score = np.einsum("nd,npd->np", queries, r_items)
    if level is None:
        r_score = r_score + bonus[None, :]
    else:
        r_score = temperature * np.logaddexp(r_score / temperature, (bonus[None, :] + level[:, None]) / temperature)
    r_score = np.where(valid, r_score, -np.inf)
    ok = ranked >= 0
    a_score = np.einsum("nd,nwd->nw", queries, items[np.clip(ranked, 0, None)])
    in_hist = (ranked[:, :, None] == np.where(valid, recent, -2)[:, None, :]).any(2)
    a_score = np.where(ok & ~in_hist, a_score, -np.inf)
    ids = np.concatenate([ranked, recent], axis=1)
    score = np.concatenate([a_score, r_score], axis=1)
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(ids, order, axis=1)
    return np.where(np.take_along_axis(score, order, axis=1) > -np.inf, best, -1)
