"""The model's input built from stream batches (trainer/model/inputs.py)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from data.io import join
from data.loader import make_loader
from data.stream import ExampleStream
from trainer.model.inputs import ModelInput
from trainer.model.negatives import UniformNegatives


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
    uniform = UniformNegatives(40, n_items, seed=3)
    batches = collect(make_loader(ExampleStream(prepared, 64, extra_rows=uniform, seed=3)), 3)
    again = collect(make_loader(ExampleStream(prepared, 64, extra_rows=uniform, seed=3)), 3)
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


def test_item_features_on_the_device_match_the_packed_host_path(tiny_prepared):
    """The mined hard negatives' model input, built by gathers on the device, equals what the stream's
    packed host path builds for the same articles (item keys; query keys are empty bags)."""
    from data.batch import packed_from_arrays
    from data.prepared import Prepared
    from data.tables import FeatureTables
    from trainer.model.inputs import ItemFeatures, model_input

    prepared, m = tiny_prepared
    tables = FeatureTables(Prepared.read(prepared))
    keys = ["customer_id", "history", "article_id", "section", "colour_group", "desc_tokens"]
    ids = np.array([3, 1, 3, 250, 7, 0, 499])
    got = ItemFeatures(tables, keys, torch.device("cpu")).model_input(torch.from_numpy(ids))
    want = model_input(packed_from_arrays(tables, np.zeros(len(ids)), ids, np.zeros(len(ids))), keys,
                       torch.device("cpu"))
    for k in ["article_id", "section", "colour_group", "desc_tokens"]:
        assert [t.tolist() for t in got.sparse[k].to_dense()] == [t.tolist() for t in want.sparse[k].to_dense()], k
    assert got.sparse["history"].lengths().tolist() == [0] * len(ids)
    assert got.article_idx.tolist() == ids.tolist()
