"""A finished or running train run seen from outside: where its checkpoints are, which one it selected, its
saved config typed by today's schema, and its model loaded weights-only (``load_run``). Export, recommend,
bundle and a warm start find a run here. Above the builder and the embedder: neither imports it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from data.io import fs_and_path, join
from data.prepared import Prepared
from trainer.config import TrainJob
from trainer.loop.builder import build
from trainer.loop.checkpoint import CheckpointManager, Found, best, latest
from trainer.loop.fingerprint import PREDATING, data_digest, fingerprint
from trainer.loop.state import ModelState
from trainer.model.towers import RENAMED
from trainer.parallel import distributed as D
from trainer.retrieval.embedder import Embedder

log = logging.getLogger(__name__)


@dataclass
class RunInfo:
    train_dir: str
    checkpoint: str
    step: int
    fingerprint_id: str
    data_digest: str


def typed(config, world_size: int = 1) -> DictConfig:
    """A saved train config, typed by the train schema again (choices become enums, keys are checked).
    A setting the run predates takes what the code did then (trainer/loop/fingerprint.py PREDATING), not
    today's default: a run saved before ``model.repeat_mode`` existed keeps the bonus. A run from before
    the batch was global (``trainer.batch_size`` per rank) gets ``global_batch_size`` = that times the
    ``world_size`` it ran on."""
    saved = OmegaConf.create(config)
    loop = saved.get("trainer")
    if loop is not None and "batch_size" in loop:
        loop["global_batch_size"] = int(loop.pop("batch_size")) * world_size
    model = saved.get("model")
    for key, value in PREDATING.items():
        name = key.split(".", 1)[1]
        if model is not None and name not in model:
            model[name] = value
    return OmegaConf.merge(OmegaConf.structured(TrainJob), saved)


def choose_checkpoint(folder: str, which: str):
    """(the checkpoint, what it is): ``selected`` is ``best`` when the run chose one by validation
    (trainer.select_metric), else ``latest``."""
    if which == "selected":
        newest = latest(folder)
        which = "best" if newest is not None and newest.info.get("best") else "latest"
    return (latest(folder) if which == "latest" else best(folder)), which


def checkpoint_folder(train_dir: str) -> str:
    """Where a train run keeps its checkpoints (its config.yaml may point elsewhere)."""
    url = join(train_dir, "config.yaml")
    fs, path = fs_and_path(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no train run here; train first or set train_dir")
    with fs.open(path, "r") as f:
        saved = OmegaConf.create(f.read())
    return saved.get("checkpoint_dir") or join(train_dir, "checkpoints")


def selected_checkpoint(train_dir: str, which: str = "selected") -> tuple[Found, str]:
    """The checkpoint of ``train_dir`` that ``which`` names (see :func:`choose_checkpoint`), and what it is;
    an error naming the folder when there is none."""
    folder = checkpoint_folder(train_dir)
    found, which = choose_checkpoint(folder, which)
    if found is None:
        raise FileNotFoundError(f"{folder}: no complete checkpoint to load" + (
            "" if which == "latest" else " as best (did the run validate?); use checkpoint=latest"))
    return found, which


def load_run(train_dir: str, which: str = "selected", device: str = "auto") -> tuple[Embedder, RunInfo]:
    """A checkpoint of ``train_dir``, weights only, under the config of the run that wrote it
    (recorded in the checkpoint): ``which="selected"``, the one the run chose (its best validation,
    or the newest when it did not validate); ``"best"``; ``"latest"``. Refuses it if the prepared data
    changed since."""
    found, which = selected_checkpoint(train_dir, which)
    folder = checkpoint_folder(train_dir)
    cfg = typed(found.info["config"], int(found.info.get("world_size", 1)))
    dist_ = D.init(device)
    manifest = Prepared.read(cfg.prepare.out)
    built = build(cfg, manifest, dist_.device, print_plan=False)
    saved = found.info.get("fingerprint", {})
    if saved.get("data.digest") != data_digest(manifest):
        raise RuntimeError(
            f"{found.path} was trained on other prepared data than {cfg.prepare.out} holds now (data digest "
            f"{saved.get('data.digest')} vs {data_digest(manifest)}); re-run training, or prepare the data "
            "as it was")
    manager = CheckpointManager(folder, {"model": ModelState(built.model)}, fingerprint(cfg, manifest),
                                renamed=RENAMED)
    loaded = manager.load(only={"model"}, step=found.step)
    if loaded is None:
        raise FileNotFoundError(f"{folder}: no readable checkpoint")
    # the fingerprint id the checkpoint was written with: an export, index or bundle names the run so, whatever
    # settings the schema gained since (a recomputed id would change with every new setting)
    info = RunInfo(train_dir, loaded.path, loaded.step, loaded.info.get("fingerprint_id") or manager.fp_id,
                   data_digest(manifest))
    if dist_.rank == 0:
        log.info("loaded run %s: the %s checkpoint, step %d, from %s (fingerprint %s)", train_dir, which,
                 loaded.step, loaded.path, info.fingerprint_id)
    return Embedder(built.model, built.keys, manifest, dist_.device, temperature=cfg.loss.temperature,
                    cold_start_sales=int(cfg.model.cold_start_sales)), info
