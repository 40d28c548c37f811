"""Shared fixtures: small raw files in the real H&M and MovieLens formats, and a tiny synthetic dataset."""

from __future__ import annotations

import pathlib

import numpy as np
import pyarrow as pa
import pytest

from data.config import SynthConfig
from data.synth import generate

CUST_HEADER = "customer_id,FN,Active,club_member_status,fashion_news_frequency,age,postal_code"
ART_HEADER = ("article_id,product_code,prod_name,product_type_no,product_type_name,product_group_name,"
              "graphical_appearance_no,graphical_appearance_name,colour_group_code,colour_group_name,"
              "perceived_colour_value_id,perceived_colour_value_name,perceived_colour_master_id,"
              "perceived_colour_master_name,department_no,department_name,index_code,index_name,index_group_no,"
              "index_group_name,section_no,section_name,garment_group_no,garment_group_name,detail_desc")
TX_HEADER = "t_dat,customer_id,article_id,price,sales_channel_id"

C1, C2, C3 = ("a" * 64, "b" * 64, "c" * 64)


def article_row(article_id: str, name: str = "Strap top", desc: str = "Jersey top with narrow shoulder straps.") -> str:
    return (f"{article_id},{article_id[:7]},{name},253,Vest top,Garment Upper body,1010016,Solid,09,Black,4,Dark,"
            f"5,Black,1676,Jersey Basic,A,Ladieswear,1,Ladieswear,16,Womens Everyday Basics,1002,Jersey Basic,{desc}")


def write_hm_fixture(folder: pathlib.Path) -> dict:
    """H&M-format CSVs with known good and bad rows; returns the expected outcome per table.

    Line numbers count the header as line 1.
    """
    folder.mkdir(parents=True, exist_ok=True)
    customers = [
        CUST_HEADER,
        f"{C1},,,ACTIVE,NONE,49,52043ee2162cf5aa",  # 2 ok
        f"{C2},1.0,1.0,ACTIVE,Regularly,25,2973abc5",  # 3 ok
        f"{C3},,,PRE-CREATE,NONE,,2973abc5",  # 4 ok, age null (legitimately empty)
        f"{C1},,,ACTIVE,NONE,30,zzz",  # 5 duplicate id -> rejected
        f"{'d' * 64},,,ACTIVE,NONE,abc,zzz",  # 6 bad age -> nulled, row kept
        ",,,ACTIVE,NONE,30,zzz",  # 7 missing customer_id -> rejected
        f"{'e' * 64},,,ACTIVE,NONE,30,zzz,extra",  # 8 malformed -> rejected
    ]
    (folder / "customers.csv").write_bytes(("\n".join(customers) + "\n").encode()
                                           + b"f" * 64 + b",,,ACTIVE,NONE,31,\xff\xfe\n")  # 9 bad utf8 postal -> nulled
    articles = [
        ART_HEADER,
        article_row("0108775015"),  # 2
        article_row("0108775044", desc='"Top, with straps, in soft jersey."'),  # 3 quoted commas
        article_row("0110065001", name="Väst"),  # 4 non-ASCII but valid UTF-8
        article_row("01x0065002"),  # 5 bad article_id -> rejected
        article_row("0108775015"),  # 6 duplicate -> rejected
    ]
    (folder / "articles.csv").write_text("\n".join(articles) + "\n", encoding="utf-8")
    tx = [
        TX_HEADER,
        f"2018-09-20,{C1},0108775015,0.0508305084745762,2",  # 2 ok
        f"2018-09-20,{C1},0108775044,0.0305084745762712,2",  # 3 ok
        f"2018-09-21,{C2},0110065001,0.0152372881355932,1",  # 4 ok
        f"2018-13-45,{C2},0110065001,0.01,1",  # 5 bad date
        f"2018-09-22,{C2},0110065001,nan,1",  # 6 NaN price
        f"2018-09-22,{C2},0110065001,-0.5,1",  # 7 negative price
        f"2018-09-22,{C2},0999999001,0.02,1",  # 8 unknown article
        f"2018-09-22,{'9' * 64},0110065001,0.02,1",  # 9 unknown customer
        f"2018-09-22,{C2},0110065001,0.02",  # 10 malformed (4 fields)
        f"2018-09-22,{C3},0110065001,,2",  # 11 missing price
        f"2018-09-22,{C3},0110065001,0.02,7",  # 12 bad channel
        f"2018-09-23,{C3},0108775015,0.03,2",  # 13 ok
    ]
    (folder / "transactions_train.csv").write_bytes(("\n".join(tx) + "\n").encode()
                                                   + b"2018-09-23,\xc3\x28" + b"a" * 62 + b",0108775015,0.03,2\n")  # 14 bad utf8
    return {
        "customers": {"read": 8, "written": 5, "rejected": {"duplicate_id:customer_id": 1,
                                                             "missing_value:customer_id": 1, "malformed_row": 1},
                      "nulled": {"bad_integer:age": 1, "invalid_utf8:postal_code": 1}},
        "articles": {"read": 5, "written": 3, "rejected": {"bad_integer:article_id": 1, "duplicate_id:article_id": 1}},
        "transactions": {"read": 13, "written": 4, "rejected": {
            "bad_date:t_dat": 1, "bad_number:price": 2, "unknown_article": 1, "unknown_customer": 1,
            "malformed_row": 1, "missing_value:price": 1, "bad_integer:sales_channel_id": 1,
            "invalid_utf8:customer_id": 1}},
    }


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("synth") / "tiny")
    summary = generate(SynthConfig(), root, progress=False)
    return root, summary


def prepare_options(out: str, **kw):
    from omegaconf import OmegaConf

    from data.config import PrepareOptions

    return OmegaConf.structured(PrepareOptions(out=out, **kw))


@pytest.fixture(scope="session")
def tiny_prepared(tiny_synth, tmp_path_factory) -> tuple[str, dict]:
    """The tiny dataset prepared with the week split, in small row groups (many streaming units)."""
    from omegaconf import OmegaConf

    from data.config import DataConfig, SplitConfig
    from data.prepare import prepare

    root, _ = tiny_synth
    out = str(tmp_path_factory.mktemp("prepared") / "tiny")
    data = OmegaConf.structured(DataConfig(name="tiny", root=root))
    manifest = prepare(data, OmegaConf.structured(SplitConfig()),
                       prepare_options(out, row_group_rows=1024, shard_rows=12_000), progress=False)
    return out, manifest


def prepare_drop(root: str, parent: str | None = None, out: str | None = None, **kw):
    """A drop (data/drops.py) prepared with the week split, grown from ``parent`` when given."""
    from omegaconf import OmegaConf

    from data.config import DataConfig, SplitConfig
    from data.prepare import prepare
    from data.prepared import Prepared

    out = out or f"{root}/prepared"
    prepare(OmegaConf.structured(DataConfig(name="drop", root=root)), OmegaConf.structured(SplitConfig()),
            prepare_options(out, parent=parent, **kw), progress=False)
    return Prepared.read(out)


@pytest.fixture(scope="session")
def tiny_drops(tiny_synth, tmp_path_factory):
    """The tiny dataset's last two weeks as two drops, the second prepared grown from the first."""
    from data import drops

    root, _ = tiny_synth
    out = str(tmp_path_factory.mktemp("drops"))
    summaries = drops.weekly(root, out, 2)
    first = prepare_drop(f"{out}/week-01")
    second = prepare_drop(f"{out}/week-02", parent=first.url)
    return {"root": root, "out": out, "summaries": summaries, "first": first, "second": second}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real single-node Slurm on localhost (installed if missing), stopped at the end. A set-up
    that fails is a test failure, not a skip: CI must not pass without having run these."""
    from slurm_cluster import LocalSlurm

    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


ROOT = pathlib.Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def compose_train(prepared: str, run_dir, *overrides: str):
    """The train config of the shared debug preset (conf/experiment/debug.yaml) for in-process runs."""
    from hydra import compose, initialize_config_dir

    import trainer.config  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=["experiment=debug", f"prepare.out={prepared}",
                                                        f"run_dir={run_dir}", *overrides])


def train_in_process(prepared: str, run_dir, *overrides: str, before_fit=None) -> dict:
    """Trains in this process (one rank, gloo), as ``python -m trainer.train`` would."""
    from data.runinfo import start_run
    from trainer.parallel import distributed as D
    from trainer.train import Trainer

    cfg = compose_train(prepared, run_dir, *overrides)
    start_run(cfg)
    try:
        trainer = Trainer(cfg, str(run_dir), tensorboard=False)
        if before_fit is not None:
            before_fit(trainer)
        return trainer.fit()
    finally:
        D.shutdown()


# ---------------------------------------------------------------- serving bundles (test_bundle, test_serve)


def build_bundle(train_dir, out, *overrides):
    from hydra import compose, initialize_config_dir

    from trainer.bundle import bundle
    from trainer.parallel import distributed as D

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="bundle", overrides=[f"train_dir={train_dir}", "checkpoint=latest", "index_dir=null",
                                                       f"run_dir={out}", *overrides])
    try:
        return bundle(cfg, str(out))
    finally:
        D.shutdown()


@pytest.fixture(scope="session")
def built(tiny_prepared, tmp_path_factory):
    from trainer.retrieval.search import list_column
    from trainer.parallel import distributed as D
    from trainer.loop.runs import load_run

    prepared, _ = tiny_prepared
    base = tmp_path_factory.mktemp("bundle")
    train_in_process(prepared, base / "train", "trainer.max_steps=40", "trainer.validate=false")
    D.shutdown()
    embedder, _ = load_run(str(base / "train"), "latest")
    table = embedder.eval_rows("val")
    day = np.unique(table["day"].to_numpy())
    assert len(day) == 1  # the week split: every validation customer as of the week's first day
    customers, queries = embedder.eval_queries("val")
    items = embedder.items()
    history = list_column(table, "history")
    level, bonus = embedder.repeat_level(queries, items), embedder.repeat_bonus()
    D.shutdown()
    as_of = f"bundle.as_of={np.datetime64(int(day[0]), 'D')}"
    reports = {name: build_bundle(base / "train", base / name, as_of, f"bundle.int8={name == 'int8'}")
               for name in ("fp32", "int8")}
    return {"base": base, "prepared": prepared, "customers": customers, "queries": queries.numpy(),
            "items": items.numpy(), "history": history, "level": level, "bonus": bonus,
            "temperature": embedder.temperature, "reports": reports}


def load(built, name="fp32"):
    from trainer.serving.bundle import Bundle

    return Bundle.load(str(built["base"] / name / "output"))


def raw_customer_ids(built) -> list[str]:
    """The validation customers' raw ids."""
    from data import vocab

    values = vocab.load(built["prepared"], "customer_id")["value"]
    return [str(v) for v in values.take(pa.array(built["customers"] - 1)).to_pylist()]


