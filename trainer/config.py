"""Structured configs for training (model, loss, sharding, optimisers, loop, checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from data.config import Choice, PrepareOptions, SplitConfig, StageConfig


class ModelName(Choice):
    two_tower = "two_tower"
    mf = "mf"  # matrix factorisation (conf/model/mf.yaml): id embeddings only


class HistoryEncoder(Choice):
    auto = "auto"  # transformer where the prepared histories carry an order, else bag (trainer/model/signals.py)
    bag = "bag"  # the mean of the history's article embeddings
    transformer = "transformer"  # the ordered history, with positions, through a small transformer


class RepeatMode(Choice):
    mixture = "mixture"  # the towers' probability plus a buying-again mass set per query and position
    bonus = "bonus"  # a bonus per position added to the towers' score


class IdTables(Choice):
    grown = "grown"  # a row per vocabulary id; the vocabularies grow week by week (prepare.parent)
    managed = "managed"  # customers and articles at a fixed size behind TorchRec's MCH modules (model.managed)


class Eviction(Choice):
    lfu = "lfu"  # the least often seen ids make room (counts since admission)
    lru = "lru"  # the least recently seen
    distance_lfu = "distance_lfu"  # counts discounted by how long ago they were seen


@dataclass
class ManagedConfig:
    """model.ids=managed: the tables' fixed sizes and how their rows are given out (trainer/model/managed.py).
    The sizes are required: a table of R rows holds R - 1 ids plus one shared row for the rest."""

    customer_rows: int = 0
    article_rows: int = 0
    eviction: Eviction = Eviction.lfu
    eviction_interval: int = 20  # steps between admissions (each step's ids are recorded)


class LogQMode(Choice):
    off = "off"  # no correction
    static = "static"  # training item frequencies from data.prepare
    streaming = "streaming"  # the estimate of Yi et al. 2019, updated every step


class LossKind(Choice):
    softmax = "softmax"  # sampled softmax cross-entropy over the candidates (logQ-corrected)
    ccl = "ccl"  # SimpleX's cosine contrastive loss: (1 - cos+) + w x mean over negatives of max(0, cos- - margin)


class HardAnchor(Choice):
    positive = "positive"  # the target's neighbours, listed once per refresh (PinSage): cheap per step
    query = "query"  # the query's exact top over the catalogue, every step (ANCE): costly


class Decay(Choice):
    none = "none"  # the base learning rates throughout
    linear = "linear"  # down to min_lr_ratio of the base at the last step
    cosine = "cosine"  # half a cosine down to min_lr_ratio of the base at the last step
    plateau = "plateau"  # x plateau_factor after every validation without a new best (not below min_lr_ratio)


class FusedOptimizer(Choice):
    rowwise_adagrad = "rowwise_adagrad"
    adagrad = "adagrad"
    sgd = "sgd"
    adam = "adam"  # CUDA only (FBGEMM's CPU kernels have no Adam)


class Pipeline(Choice):
    auto = "auto"  # on with more than one rank (an input-dist to overlap), off in one process
    on = "on"
    off = "off"


class Compile(Choice):
    auto = "auto"  # on where it pays: CUDA (Triton kernels, fewer launches); off on a CPU (measured: no gain)
    on = "on"
    off = "off"


class Device(Choice):
    auto = "auto"  # CUDA when every local rank has a GPU of its own, else CPU (more ranks than GPUs: an error)
    cpu = "cpu"
    cuda = "cuda"


class Precision(Choice):
    fp32 = "fp32"
    tf32 = "tf32"  # TF32 tensor-core matmuls on CUDA (towers, logits); float32 everywhere else
    bf16 = "bf16"  # bfloat16 autocast for the towers and logits on CUDA; tables and the softmax stay float32


class Backend(Choice):
    auto = "auto"  # nccl on CUDA, gloo on CPU
    gloo = "gloo"
    nccl = "nccl"


class Which(Choice):
    selected = "selected"  # the one the run chose: best when it validated, else latest
    latest = "latest"  # the newest complete checkpoint
    best = "best"  # the one with the best validation metric (trainer.select_metric)


class IndexKind(Choice):
    ivf_flat = "ivf_flat"
    ivf_pq = "ivf_pq"


class Period(Choice):
    val = "val"
    test = "test"


@dataclass
class ModelConfig:
    """Towers. An id-only config with no MLP (query: customer_id; item: article_id) is matrix factorisation."""

    name: ModelName = ModelName.two_tower
    id_dim: int = 64  # customer and article tables (the article table also embeds the history bag)
    feature_dim: int = 16  # categorical feature tables
    query_features: list = field(default_factory=lambda: [
        "customer_id", "age_bucket", "club_status", "news_freq", "postal_code", "history"])
    item_features: list = field(default_factory=lambda: [
        "article_id", "product_type", "product_group", "colour_group", "department", "index", "section",
        "garment_group", "desc_tokens"])
    time_features: bool = True  # sin/cos of the time of year into the query tower
    recent_sales_buckets: int = 32  # an article's sales in the week before, as a learned bonus (0: off)
    # ... per age too: weeks since its first sale (launching, 1, 2, ... capped at age_buckets - 2); an
    # article not yet sold by a row's week is no negative for it (trainer/model/sales.py). 0: off
    age_buckets: int = 0
    # Exposure for launches: added at scoring time (validation, export, bundle, never the loss) to the score of
    # an article listed since the last vocabulary version that nobody has bought yet (bucket: no sales,
    # launching), so articles new to the catalogue reach customers' top 12 where the model alone ranks them
    # just below (README, "Week after week"). Needs age_buckets and a dataset grown from a parent (what is
    # new is known); articles added to a bundle after training get it too. 0: the model's own score.
    launch_boost: float = 0.0
    repeat_positions: int = 8  # buying again an article of the last N purchases, learned (0: off)
    repeat_mode: RepeatMode = RepeatMode.mixture  # how it scores (trainer/model/repeats.py)
    # the ordered history beats the bag on every shape measured (README, "Defaults"); the bag is ~1.6x
    # faster per step on a CPU
    history_encoder: HistoryEncoder = HistoryEncoder.auto
    history_positions: int = 20  # transformer: the most recent purchases it reads, newest first
    # One layer: the [CLS] token attends to the positions (the last layer computes its row only); as good as
    # two on MovieLens-100K (3 seeds) and small, at 0.6x the step time on a CPU (README, "Defaults")
    encoder_layers: int = 1
    encoder_heads: int = 2
    dropout: float = 0.0  # in the transformer
    input_dropout: float = 0.0  # on each tower's input (its concatenated features), training only
    # New articles from their features: each global batch, this share of the catalogue's articles enter the
    # item tower without their id (the OOV row: "an article not known by id"), so the features learn to
    # place an article alone; at scoring time an article with fewer than cold_start_sales training purchases
    # is placed that way (trainer/model/cold.py). 0 / 0: off.
    id_dropout: float = 0.0
    cold_start_sales: int = 0
    # ... and every purchase of an article first sold fewer than this many days before it enters without its
    # id: a launch is learned as a never-sold article is scored (0: off)
    fresh_days: int = 0
    # the customer and article tables: a row per vocabulary id (grown), or a fixed size behind TorchRec's
    # managed-collision modules (managed; sizes in model.managed)
    ids: IdTables = IdTables.grown
    managed: ManagedConfig = field(default_factory=ManagedConfig)
    query_mlp: list = field(default_factory=lambda: [256])
    item_mlp: list = field(default_factory=lambda: [256])
    output_dim: int = 64
    normalize: bool = True  # L2-normalise both towers' outputs


@dataclass
class LossConfig:
    kind: LossKind = LossKind.softmax
    ccl_margin: float = 0.8  # ccl: a negative costs only above this cosine
    ccl_negative_weight: float = 1.0  # ccl: w, the weight of the negatives' mean hinge against the positive's term
    # ccl: the other rows' positives are negatives too (popularity-drawn; without logQ they push popular
    # articles down for everyone); off: the uniform (loss.mixed_negatives) and mined ones only, as SimpleX
    ccl_in_batch: bool = False
    temperature: float = 0.05
    logq: LogQMode = LogQMode.streaming
    streaming_alpha: float = 0.01  # step size of the streaming frequency estimate
    mask_accidental_hits: bool = True  # another row's positive that equals this row's is not a negative
    cross_rank: bool = True  # candidates all-gathered from every rank
    # uniform random catalogue articles per batch, shared by all rows; -1: every catalogue article (the full
    # softmax: where the item tower over the whole catalogue fits in a step)
    mixed_negatives: int = 1024
    hard_negatives: int = 0  # mined per row by exact search over a snapshot of the item embeddings
    hard_anchor: HardAnchor = HardAnchor.positive  # search around the row's target or its query
    hard_every: int = 0  # refresh the snapshot every N steps (0: each epoch)
    hard_rank_lo: int = 20  # skip the nearest (near-duplicates and unlabelled positives) ...
    hard_rank_hi: int = 200  # ... and sample from ranks [lo, hi)


@dataclass
class TableConstraint:
    sharding_types: list = field(default_factory=list)  # e.g. [table_wise]; empty: planner chooses
    compute_kernels: list = field(default_factory=list)  # e.g. [fused]


@dataclass
class ShardingConfig:
    constraints: dict = field(default_factory=dict)  # table name -> TableConstraint
    fused_optimizer: FusedOptimizer = FusedOptimizer.rowwise_adagrad
    fused_lr: float = 0.05
    print_plan: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-3  # dense parts (MLPs): AdamW
    weight_decay: float = 0.0
    # L2 on the id rows a batch looks up (its customers' and positive articles' rows): weight x the mean over
    # rows of their squared norms, added to the loss, so the fused table optimiser applies it to the rows a
    # batch touches (FBGEMM 1.9.0's CPU kernels ignore the TBE's own weight_decay: measured)
    table_l2: float = 0.0
    # the schedule scales both base rates (optim.lr and sharding.fused_lr) by the step (trainer/loop/schedule.py)
    warmup_steps: int = 0  # linear from 1/(warmup_steps + 1) of the base to the base
    decay: Decay = Decay.plateau  # halved per validation without a new best: fits a run early stopping ends
    min_lr_ratio: float = 0.0  # the decay's floor, as a share of the base
    plateau_factor: float = 0.5  # decay=plateau: the rates' multiplier per validation without a new best


@dataclass
class LoopConfig:
    # The training's batch: rows per step over all ranks (each rank trains global_batch_size / world
    # rows of it). The same value on 1 or N ranks is the same training (README, "Scaling out").
    global_batch_size: int = 2048
    epochs: int = 20  # the budget: validation (trainer.patience) decides when to stop
    max_steps: int = -1  # stop early (for tests and benchmarks)
    log_every: int = 50  # steps between logged losses (log file, TensorBoard, metrics.json)
    console_every_s: float = 30.0  # ... of which the console shows one every this many seconds
    checkpoint_every: int = 500  # steps; and always at the end
    # Ranks agree on a stop signal every N steps (and at each epoch end): a collective with a host read,
    # so not every step (that would stall a GPU's queue); N steps of latency against a grace of minutes.
    stop_check_every: int = 10
    keep_checkpoints: int = 3
    resume: bool = True  # from the latest complete checkpoint in the run directory
    # A warm start: another train run whose checkpoint (init_checkpoint) this run begins from, on prepared
    # data of its lineage (prepare.parent): old rows keep their weights and optimiser state, new rows start
    # as a fresh run's (trainer/loop/warm_start.py). A checkpoint of this run directory, when there is one,
    # is resumed instead: resuming a warm-started run continues it.
    init_from: Optional[str] = None
    init_checkpoint: Which = Which.selected
    # Carry the parent's optimiser state over (row-wise Adagrad's accumulators, Adam's moments). false: the
    # weights only, the optimisers start empty (Adagrad's step size as in a fresh run, not shrunk by every
    # earlier week's gradients).
    init_optimizer: bool = True
    # A warm start steps at this share of the learning rates (sharding.fused_lr and optim.lr): a trained
    # model takes smaller steps. Four weeks on small: at the full rates the chain fell 0.002 -> 0.010 MAP@12
    # behind a full retrain week by week, at a quarter it stayed within 0.004 (README, "Week after week").
    init_lr_scale: float = 0.25
    recall_k: list = field(default_factory=lambda: [12, 100])  # the k of Recall/NDCG/HitRate@k in validation
    validate: bool = True  # rank the validation customers against the catalogue after each epoch
    validate_exclude_seen: bool = "${data.exclude_seen}"  # leave out articles bought in training
    select_metric: str = "recall@12"  # the validation metric that picks the best checkpoint
    patience: int = 3  # stop after this many validations without a better select_metric (0: never)
    num_workers: int = 0  # data streams per rank: 1 in the training process, >1 loader processes; 0: auto
    # (1 on the CPU, 4 per GPU, fewer when the host has fewer cores per rank)
    shuffle_rows: int = 65_536
    seed: int = 0
    device: Device = Device.auto
    backend: Backend = Backend.auto
    precision: Precision = Precision.fp32
    # TorchRec's TrainPipelineSparseDist (the next batch's embedding input-dist overlaps this step):
    # auto = on with more than one rank, off in a single process; never with mined hard negatives
    pipeline: Pipeline = Pipeline.auto
    # torch.compile of the step's dense modules (history encoder, towers, scoring heads); the tables'
    # lookups stay TorchRec's (trainer/parallel/compile.py)
    compile: Compile = Compile.auto
    progress: bool = True


@dataclass
class TrainJob(StageConfig):
    split: SplitConfig = field(default_factory=SplitConfig)
    prepare: PrepareOptions = field(default_factory=PrepareOptions)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: LoopConfig = field(default_factory=LoopConfig)
    checkpoint_dir: Optional[str] = None  # default: <run_dir>/checkpoints


@dataclass
class ExportJob(StageConfig):
    train_dir: str = "${paths.runs}/${data.name}/train"  # the train run whose checkpoint is exported
    checkpoint: Which = Which.selected


@dataclass
class IndexOptions:
    kind: IndexKind = IndexKind.ivf_flat
    nlist: int = 0  # 0: ~8 sqrt(catalogue), at most catalogue / 39
    pq_m: int = 16  # ivf_pq: sub-quantisers (must divide the dimension)
    k: int = 12
    target_recall: float = 0.95  # recall@k against exact search the chosen nprobe must meet
    sweep_queries: int = 20_000
    gpu: Optional[bool] = None  # None: on the GPU when faiss has GPU support and a GPU is present
    seed: int = 0


@dataclass
class IndexJob(StageConfig):
    export_dir: str = "${paths.runs}/${data.name}/export"
    index: IndexOptions = field(default_factory=IndexOptions)


@dataclass
class EvaluateOptions:
    period: Period = Period.val
    ks: list = field(default_factory=lambda: [12, 100])
    exclude_seen: bool = "${data.exclude_seen}"  # drop articles the customer bought in training
    seen_margin: int = 200  # the baselines' extra candidates, so that k remain after exclusion (the model's
    # ranking fetches as many more as the longest bought list: trainer/retrieval/ranker.py)
    popularity_days: int = 7
    new_article_days: int = 28  # Recall@12 by kind of article: "new" = first sold in the N days before
    sampled_negatives: int = 100  # 0 turns the (optimistic) sampled protocol off
    runs: dict = field(default_factory=dict)  # more exported models to compare: name -> export dir
    seed: int = 0


@dataclass
class EvaluateJob(StageConfig):
    prepare: PrepareOptions = field(default_factory=PrepareOptions)
    export_dir: str = "${paths.runs}/${data.name}/export"
    index_dir: Optional[str] = "${paths.runs}/${data.name}/index"
    evaluate: EvaluateOptions = field(default_factory=EvaluateOptions)


@dataclass
class RecommendOptions:
    customers: list = field(default_factory=list)  # customer ids to recommend for (printed with names)
    submission: bool = False  # write an H&M submission for every customer (or customers_file)
    customers_file: Optional[str] = None  # a CSV with a customer_id column (e.g. sample_submission.csv)
    output: Optional[str] = None  # submission path (default <run_dir>/submission.csv)
    k: int = 12
    exclude_seen: bool = "${data.exclude_seen}"  # recommend only articles the customer has not bought
    as_of: Optional[str] = None  # recommend as of this day (YYYY-MM-DD; the data before it): a backtest;
    # default: the day after the data ends


@dataclass
class RecommendJob(StageConfig):
    train_dir: str = "${paths.runs}/${data.name}/train"
    checkpoint: Which = Which.selected
    index_dir: Optional[str] = "${paths.runs}/${data.name}/index"
    recommend: RecommendOptions = field(default_factory=RecommendOptions)


@dataclass
class BundleOptions:
    int8: bool = True  # the query tower's tables row-wise INT8 (fp32 when false)
    as_of: Optional[str] = None  # the day customers' histories are taken at (None: after the data's last day)
    nlist: int = 0  # IVF lists (0: ~8 sqrt(catalogue), at most catalogue / 39)
    nprobe: int = 0  # 0: the smallest meeting target_recall@12 against exact search on a sample of customers
    target_recall: float = 0.95
    sweep_queries: int = 2000
    popular: int = 100  # the cold-start list: the most bought articles of the last week
    exclude_seen: bool = "${data.exclude_seen}"  # what a request that does not say gets: leave bought articles out
    gpu: Optional[bool] = None  # build the index on the GPU (None: when faiss can)
    seed: int = 0
    # Articles added to the catalogue after training: an articles table (a canonical articles.parquet, or a
    # dataset root) whose rows the bundle ``base`` (default: this stage's output) does not know are placed by
    # their features and appended, the bundle published anew in place (a running service swaps it in).
    add_articles: Optional[str] = None
    base: Optional[str] = None


@dataclass
class BundleJob(StageConfig):
    train_dir: str = "${paths.runs}/${data.name}/train"
    checkpoint: Which = Which.selected
    # The index stage's index (IVF-Flat) and nprobe, which evaluate measured, are what the bundle serves when
    # it was built from this run's checkpoint; null, or none there: the bundle builds its own
    index_dir: Optional[str] = "${paths.runs}/${data.name}/index"
    bundle: BundleOptions = field(default_factory=BundleOptions)


@dataclass
class ServeOptions:
    bundle: str = "${paths.runs}/${data.name}/bundle/output"  # a bundle directory (trainer.bundle's output)
    host: str = "127.0.0.1"  # localhost only unless told otherwise
    port: int = 8000
    # Every request is bounded before any work (a 413 or 422 naming the setting):
    max_batch: int = 256  # queries per request
    max_k: int = 1000  # articles per query
    max_results: int = 25_600  # queries x k per request
    max_history: int = 1000  # articles in an ad-hoc history
    max_body_bytes: int = 262_144  # the request body
    max_concurrency: int = 64  # requests in flight at once; more are a 429 at once rather than a queue
    reload_poll_s: float = 2.0  # how often a newly published bundle is looked for
    # Binding beyond localhost needs a bearer token (read from the environment variable TWOTOWER_SERVE_TOKEN,
    # never from a config that is written to the run directory) or this explicit opt-out
    insecure: bool = False
    threads: int = 1  # torch threads: one query's small ops gain nothing from more, and lose under load


@dataclass
class ServeJob(StageConfig):
    serve: ServeOptions = field(default_factory=ServeOptions)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainJob)
    cs.store(name="export_schema", node=ExportJob)
    cs.store(name="index_schema", node=IndexJob)
    cs.store(name="evaluate_schema", node=EvaluateJob)
    cs.store(name="recommend_schema", node=RecommendJob)
    cs.store(name="bundle_schema", node=BundleJob)
    cs.store(name="serve_schema", node=ServeJob)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="loss", name="loss_schema", node=LossConfig)


register()
