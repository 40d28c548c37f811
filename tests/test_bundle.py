"""The serving bundle (trainer/bundle.py writes it, trainer/serving/bundle.py answers from it): its answers
against the naive full-catalogue reference of tests/test_retriever.py computed from the training code's
own query and item vectors; the IVF index at nprobe = nlist against exact search; INT8 tables against
fp32; a damaged bundle refused; and loading and answering without the training code."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, load, raw_customer_ids
from test_retriever import agree, naive_top_k

K = 12


def test_the_bundle_holds_the_validation_customers_as_of_their_day(built):
    b = load(built)
    rows = b.customer_rows(raw_customer_ids(built))
    assert np.array_equal(rows, built["customers"])  # raw id -> the prepared row
    mine = b.history.take(rows)
    want = built["history"]
    assert [mine.row(i).tolist() for i in range(len(rows))] == [want.row(i).tolist() for i in range(len(rows))]


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_answers_equal_the_naive_reference_from_the_training_code(built, exclude_seen):
    """Known customers through the exported query tower and exact search = every article scored by the
    training code's vectors (with the customer's own last articles rescored, or bought ones left out)."""
    b = load(built)
    rows = b.customer_rows(raw_customer_ids(built))
    warm = np.flatnonzero(b.history.take(rows).lengths() > 0)
    q, levels = b.queries(rows[warm], b.history.take(rows[warm]))
    assert np.allclose(q, built["queries"][warm], atol=1e-5)  # the exported tower = the trained model
    if not exclude_seen:
        assert np.allclose(levels, built["level"][warm], atol=1e-4)
    hist = [built["history"].row(i).tolist() for i in warm]
    bought = b.seen(rows[warm])
    seen = [bought.row(i).tolist() for i in range(len(warm))]
    want = naive_top_k(built["items"], built["queries"][warm], K, seen=seen if exclude_seen else None,
                       history=hist, bonus=None if exclude_seen else built["bonus"],
                       level=None if exclude_seen else built["level"][warm], t=built["temperature"])
    answer = b.recommend(customer_ids=[raw_customer_ids(built)[i] for i in warm], k=K, exclude_seen=exclude_seen,
                         exact=True)
    assert agree([b.article_rows(np.array(a)).tolist() for a in answer.article_ids], want) == 1.0
    assert not any(answer.cold_start) and answer.fingerprint == built["reports"]["fp32"]["fingerprint"]


def test_bought_articles_are_every_article_bought_before_the_day(built):
    """The bundle's bought articles (its history and older lists together) against sets built from the raw
    transaction files with pyarrow, raw ids on both sides."""
    import pyarrow.dataset as ds

    b = load(built)
    root = json.loads((pathlib.Path(built["prepared"]) / "manifest.json").read_text())["root"]
    tx = ds.dataset(os.path.join(root, "transactions")).to_table(columns=["customer_id", "article_id", "t_dat"])
    before = np.asarray(tx["t_dat"].to_numpy(), "datetime64[D]") < np.datetime64(b.manifest["as_of"], "D")
    want: dict[str, set] = {}
    for c, a in zip(np.asarray(tx["customer_id"].to_pylist())[before], tx["article_id"].to_numpy()[before]):
        want.setdefault(c, set()).add(int(a))
    ids = sorted(want)[::7] + ["no-such-customer"]
    bought = b.seen(b.customer_rows(ids))
    got = [set(b.article_ids[bought.row(i)].tolist()) for i in range(len(ids))]
    assert got == [want.get(c, set()) for c in ids]
    assert len(b.older.values) < sum(len(x) for x in want.values())  # the history's articles are not stored twice


def test_the_ivf_index_at_nprobe_nlist_is_exact_search(built):
    b = load(built)
    q = built["queries"]
    b.index.nprobe = b.index.nlist
    assert agree(b.top_k(q, K).tolist(), b.top_k(q, K, exact=True).tolist()) == 1.0


def test_int8_tables_are_within_half_a_step_of_fp32_and_rank_alike(built):
    from trainer.serving.tower import Table

    w = torch.randn(50, 16)
    t = Table(w, int8=True)
    step = (w.max(1).values - w.min(1).values) / 255
    assert ((t(torch.arange(50)) - w).abs() <= step[:, None] / 2 + 1e-6).all()  # by hand: round to nearest
    fp32, int8 = load(built), load(built, "int8")
    assert json.loads((built["base"] / "int8" / "output" / "manifest.json").read_text())["int8"]
    ids = raw_customer_ids(built)
    a, b = fp32.recommend(customer_ids=ids, k=K, exact=True), int8.recommend(customer_ids=ids, k=K, exact=True)
    overlap = np.mean([len(set(x) & set(y)) / K for x, y in zip(a.article_ids, b.article_ids)])
    assert overlap >= 0.9
    sizes = {name: os.path.getsize(built["base"] / name / "output" / "query_tower.pt2") for name in ("fp32", "int8")}
    assert sizes["int8"] < 0.5 * sizes["fp32"]


def test_cold_starts_unknown_articles_and_bad_requests(built):
    from trainer.serving.bundle import BundleError

    b = load(built)
    answer = b.recommend(customer_ids=["no-such-customer"], k=5)
    assert answer.cold_start == [True] and answer.article_ids[0] == b.article_ids[b.popular[:5]].tolist()
    n = len(b.popular)
    longer = b.recommend(customer_ids=["nobody"], k=n + 20)  # past the list of best sellers: still a cold start
    assert longer.cold_start == [True] and longer.article_ids[0][:n] == b.article_ids[b.popular].tolist()
    assert len(set(longer.article_ids[0])) == n + 20
    known = int(b.article_ids[1])
    answer = b.recommend(histories=[[known, 999_999_999_999, known], [123_456_789_012]], k=5, exclude_seen=False)
    assert answer.unknown_articles == [1, 1] and answer.cold_start == [False, True]
    with pytest.raises(BundleError, match="k=100000"):
        b.recommend(customer_ids=["x"], k=100_000)
    with pytest.raises(BundleError, match="not both"):
        b.recommend(customer_ids=["x"], histories=[[known]])


def test_a_damaged_bundle_is_refused_naming_the_file(built, tmp_path):
    import shutil

    from trainer.serving.bundle import Bundle, BundleError

    copy = tmp_path / "b"
    shutil.copytree(built["base"] / "fp32" / "output", copy)
    items = copy / "items.parquet"
    data = bytearray(items.read_bytes())
    data[len(data) // 2] ^= 0xFF
    items.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="items.parquet: checksum"):
        Bundle.load(str(copy))
    items.write_bytes(bytes(data[:-10]))
    with pytest.raises(BundleError, match="items.parquet: missing or not the size"):
        Bundle.load(str(copy))
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no readable manifest.json"):
        Bundle.load(str(copy))


def test_a_manifest_must_list_every_file_and_only_the_bundles_own(built, tmp_path):
    """A forged manifest cannot skip a check: a file left out of its list, an entry outside the directory, or no
    list at all is refused by name (checksums that match are no help)."""
    import shutil

    from trainer.serving.bundle import Bundle, BundleError, bundle_digest

    copy = tmp_path / "b"
    shutil.copytree(built["base"] / "fp32" / "output", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert Bundle.load(str(copy)).digest == bundle_digest(manifest)
    left_out = {**manifest, "files": {k: v for k, v in manifest["files"].items() if k != "items.parquet"}}
    (copy / "manifest.json").write_text(json.dumps(left_out))
    with pytest.raises(BundleError, match="\\['items.parquet'\\] not listed in the manifest"):
        Bundle.load(str(copy))
    outside = {**manifest, "files": {**manifest["files"], "../../etc/hostname": {"bytes": 1, "sha256": "0"}}}
    (copy / "manifest.json").write_text(json.dumps(outside))
    with pytest.raises(BundleError, match="'../../etc/hostname' is not a file of the bundle's directory"):
        Bundle.load(str(copy))
    (copy / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "files"}))
    with pytest.raises(BundleError, match="no list of the bundle's files"):
        Bundle.load(str(copy))
    other = load(built, "int8")
    assert other.digest != Bundle.load(str(built["base"] / "fp32" / "output")).digest  # one run, two bundles


def test_loading_and_answering_needs_no_training_code(built):
    """A fresh interpreter: after loading and answering, none of the training code, TorchRec or Hydra
    has been imported."""
    code = f"""
import sys
from trainer.serving.bundle import Bundle
b = Bundle.load({str(built['base'] / 'int8' / 'output')!r})
a = b.recommend(histories=[[int(b.article_ids[1])]], k=3, exclude_seen=False)
assert len(a.article_ids[0]) == 3
banned = ("torchrec", "fbgemm_gpu", "hydra", "omegaconf", "fsspec", "trainer.loop", "trainer.model",
          "trainer.parallel", "trainer.evaluation", "trainer.retrieval.retriever", "trainer.retrieval.embedder",
          "trainer.config", "data.stream", "data.prepare", "data.io")
print(sorted(m for m in sys.modules if m.startswith(banned)))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


class _Mkdir:
    """A pickle that makes a directory when unpickled without weights_only: a stand-in for any code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _forge(src, dst, replace):
    """A copy of the archive ``src`` with entries rewritten by ``replace(entry, data) -> data``, and a
    manifest whose checksums match (a forger controls the whole directory)."""
    import shutil
    import zipfile

    from trainer.serving.bundle import MANIFEST, file_sha256

    shutil.copytree(src, dst)
    program = dst / "query_tower.pt2"
    with zipfile.ZipFile(src / "query_tower.pt2") as z:
        entries = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(program, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(name, replace(name.split("/", 1)[1], data))
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["files"]["query_tower.pt2"] = {"bytes": program.stat().st_size, "sha256": file_sha256(str(program))}
    (dst / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("forgery", ["sample_inputs", "pickled_weight", "extra_entry"])
def test_a_program_that_would_unpickle_code_is_refused_before_torch_loads_it(built, tmp_path, forgery):
    """torch.export.load runs a forged archive's pickles (shown below for the sample inputs); Bundle.load
    refuses the archive before torch reads it, even with checksums that match."""
    import io

    from trainer.serving.bundle import Bundle, BundleError

    marker = tmp_path / "ran"

    def replace(entry, data):
        if forgery == "sample_inputs" and entry.startswith("data/sample_inputs/"):
            buf = io.BytesIO()
            torch.save((_Mkdir(str(marker)),), buf)
            return buf.getvalue()
        if forgery == "pickled_weight" and entry.endswith("_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    forged = tmp_path / "forged"
    _forge(built["base"] / "fp32" / "output", forged, replace)
    if forgery == "extra_entry":
        import zipfile

        with zipfile.ZipFile(forged / "query_tower.pt2", "a") as z:
            z.writestr("query_tower/data/aotinductor/model/model.so", b"\x7fELF")
        _forge(forged, tmp_path / "forged2", lambda entry, data: data)
        forged = tmp_path / "forged2"
    if forgery == "sample_inputs":  # the threat is real: torch alone runs the forged pickle
        try:
            torch.export.load(str(forged / "query_tower.pt2"))
        except Exception:  # noqa: BLE001  (what happens after the pickle ran does not matter)
            pass
        assert marker.exists()
        marker.rmdir()
    want = {"sample_inputs": "sample_inputs.*not plain tensors", "pickled_weight": "pickled object",
            "extra_entry": "aotinductor.*not part of"}[forgery]
    with pytest.raises(BundleError, match=want):
        Bundle.load(str(forged))
    assert not marker.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_bundle_whose_index_is_built_on_the_gpu_answers_as_the_cpu_one(built, tmp_path):
    """bundle.gpu=true: FAISS trains and fills the index on the GPU, the bundle saves it for the CPU; its item
    vectors are the exported ones and at nprobe = nlist it answers as exact search."""
    from conftest import build_bundle

    from trainer.retrieval import ivf

    if not ivf.gpu_available():
        pytest.skip("faiss has no GPU support here")
    as_of = f"bundle.as_of={load(built).manifest['as_of']}"
    build_bundle(built["base"] / "train", tmp_path / "gpu", as_of, "bundle.gpu=true", "bundle.int8=false")
    gpu, cpu = load({"base": tmp_path}, "gpu"), load(built)
    assert np.array_equal(gpu.items, cpu.items)
    gpu.index.nprobe = gpu.index.nlist
    q = built["queries"]
    assert agree(gpu.top_k(q, K).tolist(), cpu.top_k(q, K, exact=True).tolist()) == 1.0


def test_articles_added_after_training_are_placed_by_the_item_tower_on_their_features(built, tmp_path):
    """A bundle takes catalogue rows it does not know (here: copies of tiny's articles under new ids) without
    a retrain: their vectors are the training code's item tower on their features with the OOV id (as the
    model scores an article it never trained on), plus the recent-sales column of an article never sold;
    they are searchable; rows it knows are skipped; a row without a feature's column is refused by name."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from data.batch import packed_from_arrays
    from data.io import read_articles
    from data.prepared import Prepared
    from trainer.bundle import add_articles
    from trainer.parallel import distributed as D
    from trainer.loop.runs import load_run
    from trainer.serving.bundle import Bundle, BundleError

    base = built["base"] / "fp32" / "output"
    old = load(built)
    catalogue = read_articles(Prepared.read(built["prepared"]).root)
    picked = catalogue.slice(10, 6)
    fresh = picked.set_column(0, picked.schema.field(0), pc.add(picked["article_id"], 9_000_000_000))
    report = add_articles(str(base), pa.concat_tables([fresh, catalogue.slice(0, 3)]), str(tmp_path / "grown"))
    assert report["added"] == 6 and report["articles"] == len(old.article_ids) - 1 + 6
    grown = Bundle.load(str(tmp_path / "grown"))
    rows = grown.article_rows(fresh["article_id"].to_numpy())
    assert (rows == np.arange(len(old.article_ids), len(old.article_ids) + 6)).all()
    assert np.array_equal(grown.items[:len(old.items)], old.items)  # nothing else moved
    try:
        emb, _ = load_run(str(built["base"] / "train"), "latest")
        arts = emb.tables.article.shape[1]
        known = old.article_rows(picked["article_id"].to_numpy())  # the same features, by their prepared rows
        assert (known > 0).all() and arts > known.max()
        batch = packed_from_arrays(emb.tables, np.zeros(6), known, np.full(6, emb.last_day), item_ids=np.zeros(6, np.int64))
        want = emb._forward(batch)[1].detach().numpy()
        score = grown.manifest["catalogue"]["new_article_score"]
    finally:
        D.shutdown()
    assert score is not None
    assert np.allclose(grown.items[rows][:, :-1], want, atol=1e-5)
    assert np.allclose(grown.items[rows][:, -1], score)
    answer = grown.recommend(histories=[[int(fresh["article_id"][0].as_py())]], k=5, exclude_seen=False, exact=True)
    assert answer.unknown_articles == [0]
    assert add_articles(str(tmp_path / "grown"), fresh, str(tmp_path / "again"))["added"] == 0
    with pytest.raises(BundleError, match="column\\(s\\) \\['section_no'\\] missing"):
        Bundle.load(str(base)).add_articles(fresh.drop_columns(["section_no"]).set_column(
            0, fresh.schema.field(0), pc.add(fresh["article_id"], 1)))
