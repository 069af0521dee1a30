"""The trial configuration: every hyperparameter of the Auto-nnU-Net HPO, NAS and HNAS spaces.

A :class:`TrialConfig` with no arguments is nnU-Net's own default, which is also the prior of every
search space. The record is plain data (JSON round-trips through :meth:`to_dict` /
:meth:`from_dict`) so it can travel between the search, the trainer subprocesses, the remote
runner and the model record.
"""

from __future__ import annotations

from .errors import AutoNNUNetError, UserInputError
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

OPTIMIZERS = ("SGD", "Adam", "AdamW")
LR_SCHEDULERS = ("PolyLR", "CosineAnnealing", "none")
LOSSES = ("Dice", "Dice+CE", "CE", "TopK10")
ENCODER_TYPES = ("conv", "residual")
#: ``model_scale`` indexes this tuple: the multiplier of nnU-Net's blocks per stage.
MODEL_SCALES = (0.5, 1.0, 1.5, 2.0)
ACTIVATIONS = ("LeakyReLU", "ReLU", "ELU", "GELU", "PReLU")
NORMALIZATIONS = ("InstanceNorm", "BatchNorm")
#: nnU-Net's configurations a trial can train (the cascade's 3d_cascade_fullres needs the low-res
#: stage's predictions as input, which this trainer does not produce). Whether the dataset's plans
#: hold one is checked against the plans (:func:`check_planned`), not here.
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
#: nnU-Net's default configuration (its planner's and ``nnUNetv2_train``'s first choice).
DEFAULT_CONFIGURATION = "3d_fullres"


class ConfigError(AutoNNUNetError, ValueError):
    """A trial configuration holds a value outside its space."""


class ConfigurationNotPlanned(UserInputError):
    """The requested nnU-Net configuration (2d, 3d_fullres, 3d_lowres) is not in the dataset's plans."""


def configuration_names(value: Any, allowed: Sequence[str], name: str = "configurations") -> list[str]:
    """``value`` as a list of configuration names among ``allowed``, in order, duplicates dropped.

    A search's searched configurations and a selection's extra candidates are both given this way
    (the request record and the search settings); an empty list passes, the caller decides.
    Raises :class:`ConfigError` naming the field and the first bad entry.
    """
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
        raise ConfigError(f"{name}: expected a list of nnU-Net configuration names, got {value!r}")
    unknown = [c for c in value if c not in allowed]
    if unknown:
        raise ConfigError(f"{name}: unknown nnU-Net configuration {unknown[0]!r}; expected some of {', '.join(allowed)}")
    return list(dict.fromkeys(value))


def planned_configurations(plans: dict) -> list[str]:
    """The configurations of ``plans`` a trial can train (those of :data:`CONFIGURATIONS`)."""
    return [name for name in plans.get("configurations", {}) if name in CONFIGURATIONS]


def check_planned(plans: dict, configurations: Sequence[str], preprocessed: Optional[Path] = None) -> None:
    """Raise :class:`ConfigurationNotPlanned` naming the first configuration the plans lack.

    With ``preprocessed`` (the dataset's preprocessed folder), a planned configuration whose data
    was not preprocessed is refused too: there is nothing to train on (``autonnunet fingerprint
    --configurations`` preprocesses it).
    """
    planned = planned_configurations(plans)
    for name in configurations:
        if name not in planned:
            raise ConfigurationNotPlanned(
                f"configuration {name!r} is not planned for this dataset (planned: {', '.join(planned) or 'none'})")
        if preprocessed is not None:
            identifier = plans["configurations"][name].get("data_identifier")
            if not identifier or not (Path(preprocessed) / identifier).is_dir():
                raise ConfigurationNotPlanned(
                    f"configuration {name!r} is planned but not preprocessed ({Path(preprocessed) / str(identifier)} "
                    f"is missing); preprocess it first: autonnunet fingerprint --workdir WORKSPACE --configurations {name} "
                    "--missing-only")


@dataclass
class TrialConfig:
    """Hyperparameters and architecture of one nnU-Net training (defaults = nnU-Net's defaults)."""

    # --- HPO ---
    optimizer: str = "SGD"
    momentum: float = 0.99  # SGD (Nesterov) only
    initial_lr: float = 1e-2
    lr_scheduler: str = "PolyLR"
    weight_decay: float = 3e-5
    oversample_foreground_percent: float = 0.33
    loss: str = "Dice+CE"
    aug_factor: float = 1.0  # multiplies every augmentation probability (capped at 1)
    # --- NAS ---
    encoder_type: str = "conv"
    model_scale: int = 1  # index into MODEL_SCALES
    base_num_features: int = 32
    max_features: int = 320
    activation: str = "LeakyReLU"
    normalization: str = "InstanceNorm"
    dropout_rate: float = 0.0
    # --- hierarchical NAS; None means "what nnU-Net's planner chose" ---
    n_stages: Optional[int] = None
    blocks_per_stage_encoder: Optional[list[int]] = None
    blocks_per_stage_decoder: Optional[list[int]] = None
    # --- nnU-Net's configuration (a searched choice with SearchSettings.configurations) ---
    configuration: str = DEFAULT_CONFIGURATION

    def validate(self) -> "TrialConfig":
        """Raise :class:`ConfigError` naming the first bad field; return self otherwise."""
        checks = [
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}"),
            ("lr_scheduler", self.lr_scheduler in LR_SCHEDULERS, f"one of {LR_SCHEDULERS}"),
            ("loss", self.loss in LOSSES, f"one of {LOSSES}"),
            ("encoder_type", self.encoder_type in ENCODER_TYPES, f"one of {ENCODER_TYPES}"),
            ("activation", self.activation in ACTIVATIONS, f"one of {ACTIVATIONS}"),
            ("normalization", self.normalization in NORMALIZATIONS, f"one of {NORMALIZATIONS}"),
            ("model_scale", 0 <= int(self.model_scale) < len(MODEL_SCALES), "an index 0-3"),
            ("momentum", 0.0 <= self.momentum < 1.0, "in [0, 1)"),
            ("initial_lr", 0.0 < self.initial_lr <= 1.0, "in (0, 1]"),
            ("weight_decay", 0.0 <= self.weight_decay <= 1.0, "in [0, 1]"),
            ("oversample_foreground_percent", 0.0 <= self.oversample_foreground_percent <= 1.0, "in [0, 1]"),
            ("aug_factor", 0.0 <= self.aug_factor <= 10.0, "in [0, 10]"),
            ("base_num_features", 1 <= self.base_num_features <= 1024, "in [1, 1024]"),
            ("max_features", self.max_features >= self.base_num_features, ">= base_num_features"),
            ("dropout_rate", 0.0 <= self.dropout_rate < 1.0, "in [0, 1)"),
            ("n_stages", self.n_stages is None or self.n_stages >= 1, "None or >= 1"),
            ("configuration", self.configuration in CONFIGURATIONS, f"one of {CONFIGURATIONS}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"TrialConfig.{name} = {getattr(self, name)!r} is invalid: expected {expected}")
        for name in ("blocks_per_stage_encoder", "blocks_per_stage_decoder"):
            value = getattr(self, name)
            if value is not None and (not value or any(int(b) < 1 for b in value)):
                raise ConfigError(f"TrialConfig.{name} = {value!r} is invalid: expected positive block counts")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrialConfig":
        """Build from a (possibly partial) dict; unknown keys are an error, missing keys take defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown TrialConfig fields: {', '.join(unknown)}")
        config = cls(**values)
        for name in ("blocks_per_stage_encoder", "blocks_per_stage_decoder"):
            value = getattr(config, name)
            if value is not None:
                setattr(config, name, [int(b) for b in value])
        return config.validate()

    def replace(self, **changes: Any) -> "TrialConfig":
        return dataclasses.replace(self, **changes).validate()
