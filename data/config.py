"""Structured configs for the data stages, registered in Hydra's ConfigStore.

The YAML under ``conf/`` chooses values; these dataclasses fix the keys and types, so a typo'd
override (``data.n_custmers=5``) fails at composition instead of being ignored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class Choice(str, Enum):
    """A config field with a fixed set of values: a wrong value fails when Hydra composes the config.
    Members compare equal to their strings and print as them (``cfg.split.protocol == "week"``)."""

    __str__ = str.__str__
    __format__ = str.__format__


class Source(Choice):
    synth = "synth"
    hm = "hm"
    movielens = "movielens"


# MovieLens releases data.ingest reads: the GroupLens .dat/u.* formats and the CSV releases
MovieLensVariant = Choice("MovieLensVariant", [(v, v) for v in (
    "ml-100k", "ml-1m", "ml-latest", "ml-latest-small", "ml-20m", "ml-25m", "ml-32m")])


class Protocol(Choice):
    week = "week"
    leave_last_n = "leave_last_n"
    random = "random"
    holdout = "holdout"  # per customer, a random share of their interactions (no order)


class HistoryOrder(Choice):
    time = "time"  # a history is the customer's latest purchases before the example
    none = "none"  # order means nothing: a random sample of the customer's other training purchases


@dataclass
class SynthConfig:
    """Scale and planted structure of the synthetic H&M-like generator (see data/synth.py)."""

    n_customers: int = 2_000
    n_articles: int = 500
    n_transactions: int = 50_000
    n_weeks: int = 26
    start_date: str = "2018-09-20"  # first day of H&M's transactions_train
    n_styles: int = 12  # latent taste clusters; each article belongs to one
    style_affinity: float = 0.9  # share of non-repurchase items bought from the customer's own styles
    secondary_style_share: float = 0.3  # of those, share from the customer's second (hidden) style
    repurchase_rate: float = 0.12  # chance an item is one the customer bought before (if any)
    basket_mean: float = 3.0  # mean items per visit (geometric)
    popularity_sigma: float = 1.6  # lognormal spread of article base popularity
    lifetime_weeks: float = 12.0  # mean decay time of an article's popularity after launch
    seasonal_share: float = 0.5  # share of articles whose popularity follows the season
    activity_sigma: float = 1.2  # lognormal spread of customer activity
    online_share: float = 0.7  # share of visits on sales channel 2 (online)
    seed: int = 0
    shard_rows: int = 2_000_000  # transactions per Parquet shard
    chunk_weeks: int = 4  # weeks generated per vectorised step (bounds memory)


@dataclass
class DataConfig:
    name: str = MISSING  # names the dataset directory under paths.datasets
    source: Source = Source.synth
    root: str = "${paths.datasets}/${data.name}"  # canonical tables (any fsspec URL)
    raw_dir: Optional[str] = None  # hm: folder with articles.csv, customers.csv, transactions_train.csv
    movielens_variant: MovieLensVariant = MovieLensVariant["ml-100k"]
    movielens_min_rating: int = 0  # keep ratings >= this as interactions (0 keeps all)
    # Nobody buys an item twice (MovieLens: a film is rated once): validation, evaluation and
    # recommendations rank only articles the customer has not bought (their options default to this).
    exclude_seen: bool = False
    # A customer's day is an ordered session (MovieLens: ratings in time order), not one basket (H&M):
    # histories may then include the day's earlier rows (prepare.history_within_day defaults to this).
    sessions: bool = False
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class PathsConfig:
    datasets: str = "datasets"  # canonical tables and prepared shards, one folder per data.name
    runs: str = "runs"  # run directories: resolved config, reports, checkpoints


@dataclass
class IngestOptions:
    batch_bytes: int = 16 << 20  # CSV block size: bounds memory while streaming (bench/ingest.py: 16 MiB reads 2x faster than 64)
    shard_rows: int = 4_000_000
    max_examples: int = 20  # rejected rows quoted in the report per reason


@dataclass
class StageConfig:
    """Fields every stage has."""

    data: DataConfig = field(default_factory=DataConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    run_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class SynthJob(StageConfig):
    pass


@dataclass
class DropsOptions:
    out: str = "${paths.datasets}/${data.name}-drops"  # week-01 .. week-<weeks>, oldest first
    weeks: int = 4  # the last N weeks of data.root, each drop everything known before its week's end
    until: Optional[str] = None  # instead: one drop of what was known before this day (YYYY-MM-DD)


@dataclass
class DropsJob(StageConfig):
    drops: DropsOptions = field(default_factory=DropsOptions)


@dataclass
class IngestJob(StageConfig):
    ingest: IngestOptions = field(default_factory=IngestOptions)


@dataclass
class SplitConfig:
    """Which interactions are evaluation targets; none of them reaches a training example or feature."""

    protocol: Protocol = Protocol.week
    val_days: int = 7  # week: the last val_days (before any test period) are validation
    test_days: int = 0  # week: an optional test period after validation (7 for H&M's protocol)
    n: int = 1  # leave_last_n: each customer's last n purchases are validation (customers with more than n)
    test_n: int = 0  # leave_last_n: ... and the test_n after them test (the last ones; n before them validation)
    ratio: float = 0.1  # random: share of interactions held out
    test_ratio: float = 0.2  # holdout: each customer's share of interactions held out as test (n more: validation)
    seed: int = 0


@dataclass
class PrepareOptions:
    out: str = "${data.root}/prepared"  # vocabularies, feature tables, example shards, eval sets
    history_len: int = 20  # last N purchases strictly before the transaction's day
    # > 0: the history length is this quantile of the customers' training interaction counts (rounded up,
    # at most history_cap) instead of history_len: a window that follows the data (0.9: 90% of customers'
    # whole training histories fit)
    history_quantile: float = 0.0
    history_cap: int = 200
    # ... or before the transaction itself, earlier rows of its day included (in file order): for data
    # whose day holds an ordered session (MovieLens ratings); an H&M day is one basket, so not there.
    history_within_day: Optional[bool] = None  # None: as data.sessions
    history_order: HistoryOrder = HistoryOrder.time
    train_days: int = 0  # > 0: training examples from the last N training days only (0: all)
    # A prepared dataset to grow from: its vocabularies keep every row, new customers, articles and feature
    # values are appended, and the manifest records the lineage, so a run on the parent can be continued here
    # (trainer.init_from). None: every vocabulary afresh, in sorted order.
    parent: Optional[str] = None
    age_edges: list = field(default_factory=lambda: [20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70])
    postal_buckets: int = 65_536  # postal codes are hashed into this many buckets
    desc_tokens: bool = True  # hashed tokens of detail_desc as an article feature
    desc_buckets: int = 16_384
    desc_max_tokens: int = 24
    shard_rows: int = 1_000_000  # examples per output shard
    row_group_rows: int = 8_192  # the streaming unit
    seed: int = 0  # the global pre-shuffle


@dataclass
class PrepareJob(StageConfig):
    split: SplitConfig = field(default_factory=SplitConfig)
    prepare: PrepareOptions = field(default_factory=PrepareOptions)



STAGES = {
    "synth": SynthJob,
    "drops": DropsJob,
    "ingest": IngestJob,
    "prepare": PrepareJob,
}


def run_dirname(overrides: str, limit: int = 120) -> str:
    """A sweep point's directory name: its overrides (``hydra.job.override_dirname``), shortened past
    ``limit`` characters to their start and a digest of them (a tuning sweep's floats in full precision
    pass a file system's 255), so the same point still lands in the same directory."""
    if len(overrides) <= limit:
        return overrides
    return f"{overrides[:limit - 14]}..{hashlib.sha1(overrides.encode()).hexdigest()[:12]}"


def register() -> None:
    if not OmegaConf.has_resolver("run_dirname"):
        OmegaConf.register_new_resolver("run_dirname", run_dirname)
    cs = ConfigStore.instance()
    for stage, node in STAGES.items():  # train's schema is registered by trainer.config
        cs.store(name=f"{stage}_schema", node=node)
    cs.store(group="data", name="data_schema", node=DataConfig)


register()
