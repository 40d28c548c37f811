"""What defines a run: a flat dict of the settings a checkpoint only makes sense with.

The model's config, the loss settings that decide which state is saved, and the identity of the
prepared data (its cardinalities and a digest of its manifest). A checkpoint records it; resuming,
exporting or recommending with a different one is an error that names the keys that differ, never a
silent restart or a silent reuse of another run's weights. Learning rates, batch size, epochs and the
like are not part of it: changing them and resuming is legitimate.
"""

from __future__ import annotations

import hashlib
import json

from omegaconf import OmegaConf

# Manifest entries that describe the data itself (not where it lies or how long prepare took).
_DATA_KEYS = ("split", "cardinalities", "customer_features", "article_features", "history_len",
              "history_within_day", "examples", "eval", "transactions")


def data_digest(manifest: dict) -> str:
    """A short digest of the prepared data: equal for the same data prepared again, anywhere."""
    ident = {k: manifest[k] for k in _DATA_KEYS if k in manifest}  # (a key newer than the manifest: absent)
    if manifest.get("history_order", "time") != "time":  # (time: as every manifest before the setting)
        ident["history_order"] = manifest["history_order"]
    shards = ident.get("examples") or {}
    ident["examples"] = {"rows": shards.get("rows"), "shards": [
        {k: v for k, v in s.items() if k != "file"} if isinstance(s, dict) else s for s in shards.get("shards", [])]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k in sorted(value):
            _flatten(f"{prefix}.{k}" if prefix else str(k), value[k], out)
    else:
        out[prefix] = value


def fingerprint(cfg, manifest: dict) -> dict:
    """Flat ``{key: value}`` of everything that defines the run's saved state."""
    model = OmegaConf.to_container(cfg.model, resolve=True) if OmegaConf.is_config(cfg.model) else dict(cfg.model)
    out: dict = {}
    _flatten("model", json.loads(json.dumps(model, default=str)), out)
    out["loss.logq"] = str(cfg.loss.logq)
    out["loss.hard_negatives"] = int(cfg.loss.hard_negatives) > 0
    _flatten("data.cardinalities", manifest["cardinalities"], out)
    out["data.history_len"] = manifest.get("history_len")
    out["data.digest"] = data_digest(manifest)
    return out


def short_id(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:12]


# Settings whose default is not what the code did before they existed: a checkpoint that predates one
# ran as this value says (buying again was the bonus before the mixture, trainer/model/repeats.py; the history
# was a bag before the transformer, now the default, was a choice).
PREDATING = {"model.repeat_mode": "bonus", "model.history_encoder": "bag"}


def schema_defaults() -> dict:
    """The model part of the fingerprint at the schema's defaults: a setting added to the schema after a
    checkpoint was written is absent from that checkpoint, and at its default it means what the old code
    did."""
    from dataclasses import asdict

    from trainer.config import ModelConfig

    out: dict = {}
    _flatten("model", json.loads(json.dumps(asdict(ModelConfig()), default=str)), out)
    return out


def predating_defaults() -> dict:
    """What a checkpoint written before a setting existed ran with: the schema's default, or PREDATING."""
    return {**schema_defaults(), **PREDATING}


def differences(saved: dict, current: dict, keys_prefix: str = "") -> list[str]:
    """``key: saved -> current`` for every key whose value differs (or exists on one side only, unless
    the checkpoint predates a setting that is now at what the code did then)."""
    defaults = predating_defaults()
    out = []
    for k in sorted(set(saved) | set(current)):
        if not k.startswith(keys_prefix):
            continue
        if k not in saved and k in defaults and current.get(k) == defaults[k]:
            continue
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: {a!r} (checkpoint) vs {b!r} (now)")
    return out
