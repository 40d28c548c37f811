"""The model's input built from stream batches (trainer/inputs.py)."""

from __future__ import annotations

import pyarrow.parquet as pq
import torch

from data.io import join
from data.stream import ExampleStream, make_loader
from trainer.inputs import ModelInput


def collect(loader, n: int) -> list:
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out


MODEL_KEYS = ["customer_id", "age_bucket", "history", "article_id", "section", "desc_tokens"]


def test_extra_items_and_the_joined_model_input(tiny_prepared):
    """Each stream batch carries M uniform catalogue articles with their features, and the model input's
    ``sparse`` holds the model's keys for the B rows then the M item-only rows; checked row by row
    against the feature tables."""
    prepared, m = tiny_prepared
    n_items = m["cardinalities"]["article_id"]
    batches = collect(make_loader(ExampleStream(prepared, 64, extra_items=40, seed=3)), 3)
    again = collect(make_loader(ExampleStream(prepared, 64, extra_items=40, seed=3)), 3)
    assert all(torch.equal(x.extra_ids, y.extra_ids) for x, y in zip(batches, again))  # deterministic
    assert not torch.equal(batches[0].extra_ids, batches[1].extra_ids)  # fresh draws per batch
    ids = torch.cat([b.extra_ids for b in batches])
    assert ids.min() >= 1 and ids.max() < n_items  # never the OOV row
    cust = {r["customer_idx"]: r for r in pq.read_table(join(prepared, "features", "customers.parquet")).to_pylist()}
    art = {r["article_idx"]: r for r in pq.read_table(join(prepared, "features", "articles.parquet")).to_pylist()}
    b = batches[0]
    hist = [h.tolist() for h in b.query["history"].to_dense()]
    expected = {k: [] for k in MODEL_KEYS}
    for row, c in enumerate(b.customer_idx.tolist()):
        expected["customer_id"].append([c])
        expected["age_bucket"].append([cust[c]["age_bucket"]])
        expected["history"].append(hist[row])
    expected["customer_id"] += [[]] * 40  # the extra rows have no query side
    expected["age_bucket"] += [[]] * 40
    expected["history"] += [[]] * 40
    for a in b.article_idx.tolist() + b.extra_ids.tolist():
        expected["article_id"].append([a])
        expected["section"].append([art[a]["section"]])
        expected["desc_tokens"].append(art[a]["desc_tokens"])
    sparse = ModelInput.from_batch(b, MODEL_KEYS).sparse
    assert sparse.keys() == MODEL_KEYS and sparse.stride() == 64 + 40
    for k in MODEL_KEYS:
        assert [t.tolist() for t in sparse[k].to_dense()] == expected[k], k
