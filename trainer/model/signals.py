"""The model follows the data's signals: settings with nothing to learn from on the prepared data are
resolved before the model is built, and the run says so.

* ``model.history_encoder=auto``: the transformer where the histories carry an order (prepared in time
  order, over more than one day or within ordered sessions), the mean-pooled bag where they do not
  (``prepare.history_order=none``, or every event on one day): an ordered encoder over an order that means
  nothing costs capacity and step time (README, "Quality without order").
* Every event on one day: the time of year is one constant and "last week's sales" are all of training's,
  so ``model.time_features`` and ``model.recent_sales_buckets`` are switched off.

Resolved in place on the run's config before the fingerprint and the checkpoints' config are written, so
export, evaluation and a resume build the same model from what the checkpoint records.
"""

from __future__ import annotations

from data.prepared import Prepared


def follow_data(model_cfg, ds: Prepared) -> list[str]:
    """Resolves ``model_cfg`` against ``ds`` in place; returns one line per decision, for the run's report."""
    notes = []
    one_day = ds.first_day == ds.last_day
    ordered = ds.history_order == "time" and (not one_day or ds.history_within_day)
    if str(model_cfg.history_encoder) == "auto":
        model_cfg.history_encoder = "transformer" if ordered else "bag"
        why = ("histories in time order" if ordered else
               "histories without order (prepare.history_order=none)" if ds.history_order != "time" else
               "every event on one day, no order within it")
        notes.append(f"model.history_encoder=auto: {model_cfg.history_encoder} ({why})")
    if one_day and model_cfg.time_features:
        model_cfg.time_features = False
        notes.append("model.time_features: off (every event on one day: the time of year is a constant)")
    if one_day and model_cfg.recent_sales_buckets:
        model_cfg.recent_sales_buckets = 0
        notes.append("model.recent_sales_buckets: 0 (every event on one day: no week before to count sales in)")
    return notes
