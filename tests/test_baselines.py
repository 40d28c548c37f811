"""Each baseline on a tiny hand-made log whose right answer is known."""

from __future__ import annotations

import numpy as np

from data.jagged import Jagged
from trainer.evaluation import baselines as bl


def inter(rows, n_customers=6, n_items=8):
    c, a, d = (np.array(x) for x in zip(*rows))
    return bl.Interactions(c, a, d, n_customers, n_items, window_days=7)


# (customer, article, day). Items 1..7; item 6 is the recent best seller, item 7 was popular long ago.
LOG = [(1, 1, 0), (1, 2, 0), (2, 1, 1), (2, 2, 1), (3, 1, 2), (3, 3, 2),
       (4, 7, 0), (5, 7, 0), (4, 7, 1), (1, 6, 20), (2, 6, 21), (3, 6, 22), (4, 6, 23), (5, 5, 23)]


def test_popularity_is_recent_popularity():
    top = bl.popularity(inter(LOG), 2, 3)
    assert top.shape == (2, 3) and top[0, :2].tolist() == [6, 5]  # 7 is old; 0 (OOV) never appears
    assert 0 not in top


def test_repurchase_puts_own_recent_items_first():
    top = bl.repurchase(inter(LOG), Jagged.from_lists([[3, 5, 3], []]), 4)
    assert top[0, :2].tolist() == [3, 5] and top[0, 2] == 6  # then popularity
    assert top[1, :2].tolist() == [6, 5]  # no history: popularity


def test_covisitation_follows_baskets():
    top = bl.covisitation(inter(LOG), Jagged.from_lists([[1]]), 3)
    assert top[0, :2].tolist() == [2, 3]  # 1 was bought with 2 twice, with 3 once


def test_item_knn_follows_shared_buyers():
    log = [(1, 1, 0), (1, 2, 0), (2, 1, 1), (2, 2, 1), (3, 3, 2), (3, 4, 2), (4, 4, 3), (5, 3, 3), (5, 1, 3)]
    top = bl.item_knn(inter(log), Jagged.from_lists([[1]]), 3)
    assert top[0, 0] == 2  # buyers of 1 are {1,2,5}; of 2 {1,2}: the most similar


def test_tfidf_follows_descriptions():
    # tokens per article 0..7: 1 "red dress", 2 "red dress long", 3 "blue jeans", others empty
    tokens = {1: [10, 11], 2: [10, 11, 12], 3: [13, 14]}
    top = bl.tfidf(inter(LOG), Jagged.from_lists([[1]]), Jagged.from_lists([tokens.get(i, []) for i in range(8)]), 3)
    assert top[0, 0] == 1 and top[0, 1] == 2  # itself, then the most similar description


def test_sparse_ranking_equals_dense_ranking():
    """_rank_sparse (used at H&M scale, never densifying) against the dense _rank: same lists, with
    scores that tie, rows with fewer scored articles than k, empty rows and scores on the OOV row."""
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    n_rows, n_items, k = 300, 400, 25
    scores = sp.random(n_rows, n_items, density=0.04, random_state=1, format="csr")
    scores.data = rng.integers(1, 4, len(scores.data)).astype(np.float64)  # many equal scores
    keep = np.ones(n_rows)
    keep[::7] = 0  # some rows have nothing scored
    scores = (sp.diags(keep) @ scores).tocsr()
    popularity = rng.permutation(n_items).astype(np.float64)  # distinct: the tie-break is total
    popularity[0] = -1.0
    rank = np.argsort(-popularity, kind="stable")
    dense = bl._rank(scores.toarray(), popularity, k)
    sparse = bl._rank_sparse(scores, popularity, rank, k)
    assert (np.diff(scores.indptr) < k).any() and (np.diff(scores.indptr) > k).any()
    assert np.array_equal(sparse, dense)
    assert (sparse != 0).all()
