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


GROUPS = {g: sorted(p.stem for p in (pathlib.Path(CONF) / g).glob("*.yaml"))
          for g in ("data", "model", "loss", "split", "experiment")}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_of_every_group_composes(group, option):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"{group}={option}"])
    assert cfg.trainer.global_batch_size > 0 and cfg.model.output_dim > 0


@pytest.mark.parametrize("bad", ["loss.logq=sometimes", "sharding.fused_optimizer=adamw", "trainer.pipeline=maybe",
                                 "trainer.device=tpu", "trainer.precision=fp8", "split.protocol=weekly"])
def test_a_wrong_choice_fails_at_composition(bad):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        with pytest.raises(ConfigCompositionException):
            compose(config_name="train", overrides=[bad])


@pytest.mark.parametrize("stage,bad", [("index", "index.kind=hnsw"), ("evaluate", "evaluate.period=train"),
                                       ("ingest", "data.source=csv")])
def test_a_wrong_choice_fails_in_other_stages(stage, bad):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        with pytest.raises(ConfigCompositionException):
            compose(config_name=stage, overrides=[bad])


def test_debug_experiment_preset():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=debug"])
    assert cfg.data.name == "tiny" and cfg.trainer.epochs == 1 and not cfg.trainer.progress
    assert cfg.trainer.pipeline == "auto" and str(cfg.loss.logq) == "streaming"


def test_group_files_do_not_restate_schema_defaults():
    """A YAML option holds only what differs from the dataclass defaults."""
    from data.config import SplitConfig
    from trainer.config import LossConfig, ModelConfig

    schemas = {"model": ModelConfig(), "loss": LossConfig(), "split": SplitConfig()}
    for group, default in schemas.items():
        for option in GROUPS[group]:
            text = OmegaConf.load(pathlib.Path(CONF) / group / f"{option}.yaml") or {}
            for key, value in dict(text).items():
                identity = key in ("name", "protocol")  # the field the option is named after
                assert getattr(default, key) != value or identity, f"{group}/{option}.yaml restates {key}"


def test_the_batch_is_global_and_an_old_per_rank_batch_types_as_global():
    """trainer.batch_size (per rank) is gone: an override of it fails at composition, and a checkpoint's
    recorded config that has it types as trainer.global_batch_size = per-rank batch x its world size."""
    from trainer.config import TrainJob
    from trainer.loop.runs import typed

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        with pytest.raises(ConfigCompositionException):
            compose(config_name="train", overrides=["trainer.batch_size=256"])
    saved = OmegaConf.to_container(OmegaConf.structured(TrainJob))
    del saved["trainer"]["global_batch_size"]
    saved["trainer"]["batch_size"] = 1024
    assert typed(saved, world_size=2).trainer.global_batch_size == 2048
