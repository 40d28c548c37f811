"""Split protocols: label each interaction train (0), validation (1) or test (2).

All work on compact arrays (customer index, day number, original row order) and are vectorised.
"""

from __future__ import annotations

import numpy as np

TRAIN, VAL, TEST = 0, 1, 2
PERIODS = {"val": VAL, "test": TEST}


def week(day: np.ndarray, val_days: int = 7, test_days: int = 0) -> tuple[np.ndarray, dict]:
    """H&M protocol: the last ``test_days`` are test, the ``val_days`` before them validation."""
    last = int(day.max())
    test_start = last - test_days + 1
    val_start = test_start - val_days
    if val_start <= int(day.min()):
        raise ValueError(f"split: {val_days} validation + {test_days} test days leave no training days "
                         f"(data spans {last - int(day.min()) + 1} days)")
    label = np.where(day >= test_start, TEST, np.where(day >= val_start, VAL, TRAIN)).astype(np.int8)
    bounds = {"val_start": val_start, "test_start": test_start if test_days else None, "last_day": last}
    return label, bounds


def interaction_key(customer: np.ndarray, article: np.ndarray, day: np.ndarray) -> np.ndarray:
    """One int64 per (customer, article, day): identical rows (two units of one article bought the same
    day) are one interaction and must land on the same side of a split."""
    return (customer.astype(np.int64) << 40) | (article.astype(np.int64) << 18) | (day.astype(np.int64) & 0x3FFFF)


def leave_last_n(customer: np.ndarray, day: np.ndarray, n: int = 1,
                 article: np.ndarray | None = None, test_n: int = 0) -> tuple[np.ndarray, dict]:
    """Each customer's last ``test_n`` purchases by (day, row order) are test targets and the ``n`` before
    them validation targets, for customers with more than ``n + test_n`` purchases (so each keeps at
    least one training interaction). Rows identical to a held-out one (same customer, article and day)
    are held out with it (with the test row when it is both)."""
    order = np.lexsort((np.arange(len(day)), day, customer))
    c = customer[order]
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    counts = np.diff(np.r_[starts, len(c)])
    rank = np.arange(len(c)) - np.repeat(starts, counts)
    from_end = np.repeat(counts, counts) - rank - 1
    eligible = np.repeat(counts, counts) > n + test_n
    label = np.zeros(len(day), dtype=np.int8)
    label[order[eligible & (from_end >= test_n) & (from_end < test_n + n)]] = VAL
    label[order[eligible & (from_end < test_n)]] = TEST
    if article is not None:
        key = interaction_key(customer, article, day)
        for held in (VAL, TEST):  # test last: a row that is both goes to test
            label[np.isin(key, key[label == held])] = held
    return label, {"n": n, "test_n": test_n}


def random(n_rows: int, ratio: float, seed: int, key: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Each interaction is held out with probability ``ratio`` (not temporal: an optimistic protocol).
    With ``key`` (see interaction_key), identical rows share one draw."""
    rng = np.random.default_rng([seed, 7919])
    if key is None:
        held = rng.random(n_rows) < ratio
    else:
        uniq, inverse = np.unique(key, return_inverse=True)
        held = (rng.random(len(uniq)) < ratio)[inverse]
    return held.astype(np.int8) * VAL, {"ratio": ratio, "seed": seed}


def holdout(customer: np.ndarray, day: np.ndarray, article: np.ndarray, test_ratio: float, n: int, seed: int
            ) -> tuple[np.ndarray, dict]:
    """Per customer, a random ``test_ratio`` of their interactions (rounded, at least one) are test targets
    and ``n`` random others validation targets, for customers with more than ``n + 1`` interactions, so each
    keeps at least one training interaction (the matching benchmarks' per-user random split: no order).
    Rows identical to a held-out one (same customer, article and day) are one interaction: they share a draw."""
    key = interaction_key(customer, article, day)
    uniq, inverse = np.unique(key, return_inverse=True)
    cust = (uniq >> 40).astype(np.int64)  # uniq is sorted by customer first
    draw = np.random.default_rng([seed, 6007]).random(len(uniq))
    order = np.lexsort((draw, cust))
    starts = np.flatnonzero(np.r_[True, cust[order][1:] != cust[order][:-1]])
    counts = np.diff(np.r_[starts, len(order)])
    rank = np.arange(len(order)) - np.repeat(starts, counts)
    count = np.repeat(counts, counts)
    n_test = np.clip(np.floor(test_ratio * count + 0.5), 1, None)
    eligible = count > n + 1
    n_test = np.minimum(n_test, count - n - 1)
    label_u = np.zeros(len(uniq), dtype=np.int8)
    label_u[order[eligible & (rank < n_test)]] = TEST
    label_u[order[eligible & (rank >= n_test) & (rank < n_test + n)]] = VAL
    return label_u[inverse], {"test_ratio": test_ratio, "n": n, "seed": seed}


def assign(protocol: str, customer: np.ndarray, day: np.ndarray, cfg,
           article: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    if protocol == "week":
        return week(day, cfg.val_days, cfg.test_days)
    if protocol == "leave_last_n":
        return leave_last_n(customer, day, cfg.n, article, cfg.test_n)
    if protocol == "random":
        key = None if article is None else interaction_key(customer, article, day)
        return random(len(day), cfg.ratio, cfg.seed, key)
    if protocol == "holdout":
        if article is None:
            raise ValueError("split.protocol=holdout needs the articles (identical rows share a side)")
        return holdout(customer, day, article, cfg.test_ratio, cfg.n, cfg.seed)
    raise ValueError(f"split.protocol={protocol!r}: expected week, leave_last_n, random or holdout")
