"""Warm start: the reference's published incumbents as extra first candidates of a search.

Auto-nnU-Net published the incumbent it found on each of the 10 MSD tasks for each space
(:mod:`AutoNNUNetLib.search.reference_incumbents`). A new search tries those of *other* datasets
first, beside the prior: configurations that were best somewhere are better first guesses than
random ones. The entries of the dataset being searched are left out by name (leave-one-dataset-
out), so a benchmark on hippocampus never sees the hippocampus incumbents.

Each entry is mapped to a :class:`~AutoNNUNetLib.config.TrialConfig` in our names and projected
onto the searched space: fields the space does not search keep nnU-Net's defaults (an hpo search
takes only the hyperparameters of an hpo_nas entry). HNAS entries hold only their hyperparameters
(the reference did not publish the derivations), so they add no architecture.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

from ..config import TrialConfig

#: The reference's names -> ours.
ENCODERS = {"ConvolutionalEncoder": "conv", "ResidualEncoderM": "residual"}
LOSSES = {"DiceLoss": "Dice", "CrossEntropyLoss": "CE", "DiceAndCrossEntropyLoss": "Dice+CE", "TopKLoss": "TopK10"}
SCHEDULERS = {"PolyLRScheduler": "PolyLR", "CosineAnnealingLR": "CosineAnnealing", "None": "none", None: "none"}

HPO_FIELDS = ("optimizer", "momentum", "initial_lr", "lr_scheduler", "weight_decay",
              "oversample_foreground_percent", "loss", "aug_factor")
NAS_FIELDS = ("encoder_type", "model_scale", "base_num_features", "max_features", "activation",
              "normalization", "dropout_rate")
#: The TrialConfig fields each space searches (HNAS's architecture comes from its grammar).
SPACE_FIELDS = {"hpo": HPO_FIELDS, "hpo_nas": HPO_FIELDS + NAS_FIELDS, "hpo_hnas": HPO_FIELDS}


def config_from_entry(entry: dict[str, Any]) -> TrialConfig:
    """One published incumbent in our names (every field it has; validated)."""
    hp = dict(entry["hp_config"])
    values: dict[str, Any] = {}
    for name in ("optimizer", "initial_lr", "weight_decay", "oversample_foreground_percent", "aug_factor",
                 "base_num_features", "max_features", "activation", "normalization", "dropout_rate", "model_scale"):
        if name in hp:
            values[name] = hp[name]
    if hp.get("optimizer", "SGD") == "SGD" and "momentum" in hp:
        values["momentum"] = hp["momentum"]
    if "loss_function" in hp:
        values["loss"] = LOSSES[hp["loss_function"]]
    if "lr_scheduler" in hp:
        values["lr_scheduler"] = SCHEDULERS[hp["lr_scheduler"]]
    if "encoder_type" in hp:
        values["encoder_type"] = ENCODERS[hp["encoder_type"]]
    for name in ("base_num_features", "max_features", "model_scale"):
        if name in values:
            values[name] = int(values[name])
    return TrialConfig.from_dict(values)


def task_name(dataset: str) -> str:
    """``Dataset004_Hippocampus`` / ``Task04_Hippocampus`` / ``hippocampus`` -> ``hippocampus``."""
    return re.sub(r"^(dataset|task)\d+_", "", dataset.strip().lower())


def project(config: TrialConfig, space: str) -> TrialConfig:
    """``config`` restricted to the fields ``space`` searches (the rest: nnU-Net's defaults)."""
    fields = SPACE_FIELDS[space]
    return TrialConfig.from_dict({k: v for k, v in config.to_dict().items() if k in fields})


def portfolio(space: str, dataset: Optional[str], entries: Optional[Iterable[dict[str, Any]]] = None,
              ) -> list[TrialConfig]:
    """Warm-start candidates for a ``space`` search on ``dataset``: its own space's entries first,
    projected onto ``space``, the searched dataset's left out, duplicates and the default dropped."""
    if entries is None:
        from .reference_incumbents import ENTRIES as entries
    left_out = task_name(dataset) if dataset else None
    own = [e for e in entries if task_name(e["dataset"]) != left_out]
    ordered = [e for e in own if e["space"] == space] + [e for e in own if e["space"] != space]
    seen = {tuple(sorted(TrialConfig().to_dict().items(), key=str))}
    result = []
    for entry in ordered:
        config = project(config_from_entry(entry), space)
        key = tuple(sorted(config.to_dict().items(), key=str))
        if key not in seen:
            seen.add(key)
            result.append(config)
    return result
