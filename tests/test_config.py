"""Every primary config composes with every data preset, and typos fail loudly."""

from __future__ import annotations

import pathlib

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import trainer.config  # noqa: F401  (registers the train schema)
from data.config import STAGES

CONF = str(pathlib.Path(__file__).resolve().parents[1] / "conf")
PRESETS = sorted(p.stem for p in (pathlib.Path(CONF) / "data").glob("*.yaml"))


def test_presets_present():
    assert {"tiny", "small", "hm_scale", "hm", "movielens"} <= set(PRESETS)


@pytest.mark.parametrize("stage", sorted([*STAGES, "train", "export", "index", "evaluate", "recommend"]))
@pytest.mark.parametrize("preset", PRESETS)
def test_every_stage_composes(stage, preset):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=stage, overrides=[f"data={preset}"])
    assert cfg.data.root.endswith(cfg.data.name)
    assert cfg.data.source in ("synth", "hm", "movielens")
    if cfg.data.source != "synth":
        assert cfg.data.raw_dir is None  # ingest asks for it by name (test_ingest covers the message)


def test_hm_scale_matches_kaggle_sizes():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        s = compose(config_name="synth", overrides=["data=hm_scale"]).data.synth
    assert (s.n_customers, s.n_articles, s.n_transactions, s.n_weeks) == (1_371_980, 105_542, 31_788_324, 105)


@pytest.mark.parametrize("bad", ["data.synth.n_custmers=5", "data.nmae=x", "paths.dataset=/tmp"])
def test_typo_in_override_fails(bad):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        with pytest.raises(ConfigCompositionException):
            compose(config_name="synth", overrides=[bad])


def test_wrong_type_fails():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        with pytest.raises(ConfigCompositionException):
            compose(config_name="synth", overrides=["data.synth.n_customers=many"])


def test_unknown_preset_fails():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        with pytest.raises(ConfigCompositionException):
            compose(config_name="synth", overrides=["data=hm_scael"])


def test_movielens_name_follows_variant():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="ingest", overrides=["data=movielens", "data.movielens_variant=ml-1m",
                                                        "data.raw_dir=/x"])
    assert cfg.data.name == "ml-1m" and OmegaConf.select(cfg, "data.root") == "datasets/ml-1m"


@pytest.mark.parametrize("split", ["week", "leave_last_n", "random"])
def test_prepare_split_presets(split):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="prepare", overrides=[f"split={split}"])
    assert cfg.split.protocol == split
    assert cfg.prepare.out == f"{cfg.data.root}/prepared"
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        with pytest.raises(ConfigCompositionException):
            compose(config_name="prepare", overrides=["split.ration=0.2"])
