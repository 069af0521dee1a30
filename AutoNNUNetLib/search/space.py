"""The Auto-nnU-Net search spaces as NePS ``PipelineSpace`` subclasses.

Three spaces, each a superset of the previous one's hyperparameter part:

- ``hpo``: optimizer (with SGD's momentum as a conditional child), learning rate, LR schedule,
  weight decay, foreground oversampling, loss and augmentation strength.
- ``hpo_nas``: ``hpo`` plus the network: encoder type, model scale (blocks-per-stage multiplier),
  base and maximum feature width, activation, normalization, dropout.
- ``hpo_hnas``: ``hpo`` plus a grammar over the U-Net (see :class:`HPOHNASSpace`).

Any of them may also choose nnU-Net's configuration (``configurations``: 2d / 3d_fullres /
3d_lowres, those the plans hold; prior: the prior's, nnU-Net's 3d_fullres by default). With only
3d_fullres the space has no such parameter (the spaces of earlier searches stay the same).

Every parameter's prior is nnU-Net's default (the values of ``TrialConfig()``), so PriorBand's
prior sample *is* stock nnU-Net. Conditional parts (momentum, the encoder branches of the HNAS
grammar) are ``neps.Operation`` choices inside a ``neps.Categorical``: NePS samples the children of
a branch only when that branch is chosen. Each operation returns a dict of
:class:`~AutoNNUNetLib.config.TrialConfig` fields, so turning a resolved NePS pipeline into a
``TrialConfig`` is a flat dict merge (:func:`trial_config_from_values`).

Mapping both ways:

- :func:`config_from_neps` - a NePS config (``SAMPLING__...``/``ENVIRONMENT__...`` keys, as stored
  in a trial) -> ``(TrialConfig, epochs)``.
- :func:`neps_config_from_trial` - ``TrialConfig`` (+ epochs) -> that NePS config, by building the
  space with the configuration as its prior and taking the prior sample.
- :func:`plain_name` - NePS's column name -> a readable parameter path.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Mapping, Optional, Sequence

import neps

from ..network import default_encoder_blocks
from ..config import (
    ACTIVATIONS,
    CONFIGURATIONS,
    DEFAULT_CONFIGURATION,
    ENCODER_TYPES,
    LOSSES,
    LR_SCHEDULERS,
    MODEL_SCALES,
    NORMALIZATIONS,
    OPTIMIZERS,
    ConfigError,
    TrialConfig,
)

SpaceName = Literal["hpo", "hpo_nas", "hpo_hnas"]
Confidence = Literal["low", "medium", "high"]

#: The name of the fidelity parameter in every space.
FIDELITY = "epochs"
#: Default fidelity bounds (epochs), as in the Auto-nnU-Net reference.
DEFAULT_MIN_EPOCHS = 10
DEFAULT_MAX_EPOCHS = 1000

#: Decoder convolutions per stage: range and prior of the HNAS grammar.
DECODER_BLOCKS_RANGE = (1, 4)
DECODER_BLOCKS_PRIOR = 2


# --------------------------------------------------------------------------------------------
# Grammar operators. They run when NePS resolves a pipeline; each returns TrialConfig fields.
# Module-level functions so the space pickles (NePS stores it in the search root).
# --------------------------------------------------------------------------------------------


def _optimizer(name: str, momentum: float = TrialConfig.momentum) -> dict[str, Any]:
    return {"optimizer": name, "momentum": float(momentum)}


def _blocks(*blocks: int) -> list[int]:
    return [int(b) for b in blocks]


def _encoder(
    encoder_type: str,
    blocks: list[int],
    normalization: str,
    activation: str,
    dropout_rate: float,
) -> dict[str, Any]:
    return {
        "encoder_type": encoder_type,
        "blocks_per_stage_encoder": list(blocks),
        "normalization": normalization,
        "activation": activation,
        "dropout_rate": float(dropout_rate),
    }


def _decoder(blocks: list[int]) -> dict[str, Any]:
    return {"blocks_per_stage_decoder": list(blocks)}


def _configured_network(configuration: str, n_stages: int, encoder: dict[str, Any],
                        decoder: dict[str, Any]) -> dict[str, Any]:
    """One configuration's branch of the HNAS grammar (its planner's stage count differs)."""
    return {"configuration": configuration, "n_stages": int(n_stages), **encoder, **decoder}


# --------------------------------------------------------------------------------------------
# Parameter builders
# --------------------------------------------------------------------------------------------


def _categorical(choices: tuple, value: Any, confidence: Confidence, name: str) -> "neps.Categorical":
    if value not in choices:
        raise ConfigError(f"{name} = {value!r} is not in the search space {choices}")
    return neps.Categorical(choices, prior=choices.index(value), prior_confidence=confidence)


def _float(lower: float, upper: float, value: float, confidence: Confidence, name: str, log: bool = False) -> "neps.Float":
    if not lower <= float(value) <= upper:
        raise ConfigError(f"{name} = {value!r} is outside the search space [{lower}, {upper}]")
    return neps.Float(lower, upper, log=log, prior=float(value), prior_confidence=confidence)


def _integer(lower: int, upper: int, value: int, confidence: Confidence, name: str) -> Any:
    if not lower <= int(value) <= upper:
        raise ConfigError(f"{name} = {value!r} is outside the search space [{lower}, {upper}]")
    if lower == upper:
        return int(lower)  # a one-value range is a constant (NePS needs lower < upper)
    return neps.Integer(lower, upper, prior=int(value), prior_confidence=confidence)


def _hpo_parameters(prior: TrialConfig, confidence: Confidence) -> dict[str, Any]:
    """The HPO part shared by all three spaces (ranges of DESIGN.md section 3)."""
    optimizer_choices = []
    for name in OPTIMIZERS:
        kwargs: dict[str, Any] = {"name": name}
        if name == "SGD":  # momentum only exists for SGD (Nesterov)
            momentum = prior.momentum if prior.optimizer == "SGD" else TrialConfig.momentum
            kwargs["momentum"] = _float(0.5, 0.999, momentum, confidence, "momentum", log=True)
        optimizer_choices.append(neps.Operation(_optimizer, kwargs=kwargs))
    if prior.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer = {prior.optimizer!r} is not in the search space {OPTIMIZERS}")
    return {
        "optimizer": neps.Categorical(
            tuple(optimizer_choices), prior=OPTIMIZERS.index(prior.optimizer), prior_confidence=confidence
        ),
        "initial_lr": _float(1e-5, 1e-1, prior.initial_lr, confidence, "initial_lr", log=True),
        "lr_scheduler": _categorical(LR_SCHEDULERS, prior.lr_scheduler, confidence, "lr_scheduler"),
        "weight_decay": _float(1e-6, 1e-2, prior.weight_decay, confidence, "weight_decay", log=True),
        "oversample_foreground_percent": _float(
            0.0, 1.0, prior.oversample_foreground_percent, confidence, "oversample_foreground_percent"
        ),
        "loss": _categorical(LOSSES, prior.loss, confidence, "loss"),
        "aug_factor": _float(0.0, 3.0, prior.aug_factor, confidence, "aug_factor"),
    }


def _width_parameters(prior: TrialConfig, confidence: Confidence) -> dict[str, Any]:
    return {
        "base_num_features": _integer(16, 64, prior.base_num_features, confidence, "base_num_features"),
        "max_features": _integer(160, 640, prior.max_features, confidence, "max_features"),
    }


def _nas_parameters(prior: TrialConfig, confidence: Confidence) -> dict[str, Any]:
    return {
        "encoder_type": _categorical(ENCODER_TYPES, prior.encoder_type, confidence, "encoder_type"),
        "model_scale": _integer(0, len(MODEL_SCALES) - 1, prior.model_scale, confidence, "model_scale"),
        **_width_parameters(prior, confidence),
        "activation": _categorical(ACTIVATIONS, prior.activation, confidence, "activation"),
        "normalization": _categorical(NORMALIZATIONS, prior.normalization, confidence, "normalization"),
        "dropout_rate": _float(0.0, 0.5, prior.dropout_rate, confidence, "dropout_rate"),
    }


def _prior_blocks(prior: Optional[list[int]], defaults: list[int], scale: float = 1.0) -> list[int]:
    """Per-stage prior block counts: the config's own, padded with (scaled) defaults."""
    scaled = [max(1, math.ceil(d * scale)) for d in defaults]
    if prior is None:
        return scaled
    return [int(prior[i]) if i < len(prior) else scaled[i] for i in range(len(defaults))]


def _configuration_parameter(prior: TrialConfig, confidence: Confidence,
                             configurations: tuple[str, ...]) -> dict[str, Any]:
    """nnU-Net's configuration as a choice; nothing when only 3d_fullres (nnU-Net's default) is searched."""
    if configurations == (DEFAULT_CONFIGURATION,) and prior.configuration == DEFAULT_CONFIGURATION:
        return {}
    if len(configurations) == 1:
        if prior.configuration != configurations[0]:
            raise ConfigError(f"configuration = {prior.configuration!r} is not in the search space {configurations}")
        return {"configuration": configurations[0]}  # a constant: every trial trains it
    return {"configuration": _categorical(configurations, prior.configuration, confidence, "configuration")}


def _hnas_branches(prior: TrialConfig, confidence: Confidence, configurations: tuple[str, ...],
                   planned_stages: Mapping[str, int]) -> dict[str, Any]:
    """The HNAS grammar under a configuration choice: each configuration has its own stage count."""
    if prior.configuration not in configurations:
        raise ConfigError(f"configuration = {prior.configuration!r} is not in the search space {configurations}")
    branches = []
    for name in configurations:
        if name not in planned_stages:
            raise ConfigError(f"the hpo_hnas space needs the planner's stage count of configuration {name!r}")
        # The chosen branch is centred on the prior; the others on nnU-Net's default there.
        own = prior if name == prior.configuration else TrialConfig(configuration=name)
        grammar = _hnas_parameters(own, confidence, int(planned_stages[name]))
        branches.append(neps.Operation(_configured_network, kwargs={
            "configuration": name, "n_stages": grammar["n_stages"], "encoder": grammar["encoder"],
            "decoder": grammar["decoder"]}))
    return {
        "configuration": neps.Categorical(tuple(branches), prior=configurations.index(prior.configuration),
                                          prior_confidence=confidence),
        **_width_parameters(prior, confidence),
    }


def _hnas_parameters(prior: TrialConfig, confidence: Confidence, planned_stages: int) -> dict[str, Any]:
    """The U-Net grammar: stages, encoder branch (with its blocks/norm/activation/dropout), decoder."""
    if planned_stages < 1:
        raise ConfigError(f"the planner's stage count must be >= 1, got {planned_stages}")
    n = planned_stages
    min_stages = max(1, math.ceil(n / 2))
    n_stages_prior = n if prior.n_stages is None else int(prior.n_stages)
    scale = MODEL_SCALES[int(prior.model_scale)]

    branches = []
    for encoder_type in ENCODER_TYPES:
        defaults = default_encoder_blocks(n, encoder_type)
        chosen = prior.encoder_type == encoder_type
        block_priors = _prior_blocks(prior.blocks_per_stage_encoder if chosen else None, defaults, scale if chosen else 1.0)
        block_params = tuple(
            _integer(1, 2 * d, p, confidence, f"blocks_per_stage_encoder[{i}]")
            for i, (d, p) in enumerate(zip(defaults, block_priors))
        )
        # Each encoder branch carries its own norm/activation/dropout choices (they also apply to
        # the decoder: stock dynamic_network_architectures shares them across the network).
        own = prior if chosen else TrialConfig()
        branches.append(
            neps.Operation(
                _encoder,
                kwargs={
                    "encoder_type": encoder_type,
                    "blocks": neps.Operation(_blocks, args=block_params),
                    "normalization": _categorical(NORMALIZATIONS, own.normalization, confidence, "normalization"),
                    "activation": _categorical(ACTIVATIONS, own.activation, confidence, "activation"),
                    "dropout_rate": _float(0.0, 0.5, own.dropout_rate, confidence, "dropout_rate"),
                },
            )
        )
    if prior.encoder_type not in ENCODER_TYPES:
        raise ConfigError(f"encoder_type = {prior.encoder_type!r} is not in the search space {ENCODER_TYPES}")

    decoder_priors = _prior_blocks(prior.blocks_per_stage_decoder, [DECODER_BLOCKS_PRIOR] * (n - 1))
    lo, hi = DECODER_BLOCKS_RANGE
    decoder_params = tuple(
        _integer(lo, hi, p, confidence, f"blocks_per_stage_decoder[{i}]") for i, p in enumerate(decoder_priors)
    )
    return {
        "n_stages": _integer(min_stages, n, n_stages_prior, confidence, "n_stages"),
        "encoder": neps.Categorical(
            tuple(branches), prior=ENCODER_TYPES.index(prior.encoder_type), prior_confidence=confidence
        ),
        "decoder": neps.Operation(_decoder, kwargs={"blocks": neps.Operation(_blocks, args=decoder_params)}),
        **_width_parameters(prior, confidence),
    }


# --------------------------------------------------------------------------------------------
# The spaces
# --------------------------------------------------------------------------------------------


class _AutoNNUNetSpace(neps.PipelineSpace):
    """Common constructor: parameters are instance attributes because their priors, confidence
    and fidelity bounds are chosen per search (NePS reads both class and instance attributes)."""

    def __init__(
        self,
        *,
        min_epochs: int = DEFAULT_MIN_EPOCHS,
        max_epochs: int = DEFAULT_MAX_EPOCHS,
        prior_confidence: Confidence = "medium",
        prior: Optional[TrialConfig] = None,
        planned_stages: Optional[Any] = None,
        configurations: Optional[Sequence[str]] = None,
    ):
        if not 1 <= int(min_epochs) < int(max_epochs):
            raise ConfigError(f"epochs must satisfy 1 <= min < max, got [{min_epochs}, {max_epochs}]")
        if prior_confidence not in ("low", "medium", "high"):
            raise ConfigError(f"prior_confidence must be low, medium or high, got {prior_confidence!r}")
        prior = (prior or TrialConfig()).validate()
        choices = tuple(dict.fromkeys(configurations or (prior.configuration,)))
        unknown = [c for c in choices if c not in CONFIGURATIONS]
        if unknown:
            raise ConfigError(f"configuration {unknown[0]!r} is not one of {CONFIGURATIONS}")
        for name, parameter in self._parameters(prior, prior_confidence, planned_stages, choices).items():
            setattr(self, name, parameter)
        setattr(self, FIDELITY, neps.IntegerFidelity(int(min_epochs), int(max_epochs)))

    def _parameters(self, prior: TrialConfig, confidence: Confidence, planned_stages: Any,
                    configurations: tuple[str, ...]) -> dict[str, Any]:
        raise NotImplementedError


class HPOSpace(_AutoNNUNetSpace):
    """Training hyperparameters only; the network is nnU-Net's planned one."""

    def _parameters(self, prior, confidence, planned_stages, configurations):
        return {**_hpo_parameters(prior, confidence), **_configuration_parameter(prior, confidence, configurations)}


class HPONASSpace(_AutoNNUNetSpace):
    """Hyperparameters plus the network's block type, depth multiplier, widths and layers.

    None of these depends on the configuration's dimensionality (the builder takes the kernel
    sizes, strides and 2D/3D operators from the chosen configuration's plans).
    """

    def _parameters(self, prior, confidence, planned_stages, configurations):
        return {**_hpo_parameters(prior, confidence), **_nas_parameters(prior, confidence),
                **_configuration_parameter(prior, confidence, configurations)}


class HPOHNASSpace(_AutoNNUNetSpace):
    """Hyperparameters plus a grammar over the U-Net (hierarchical NAS).

    ``n`` is the planner's stage count (``planned_stages``, required)::

        network  := n_stages  encoder  decoder  base_num_features  max_features
        n_stages := k in [ceil(n/2), n]                             prior n
        encoder  := conv(blocks, norm, act, dropout)                prior (the default derivation)
                  | residual(blocks, norm, act, dropout)
        blocks   := b_1 .. b_n, b_i in [1, 2 * default_i]           prior default_i
                    (default: conv 2 per stage; residual nnU-Net ResEnc 1, 3, 4, 6, ...)
        norm     := InstanceNorm | BatchNorm                        prior InstanceNorm
        act      := LeakyReLU | ReLU | ELU | GELU | PReLU           prior LeakyReLU
        dropout  := p in [0, 0.5]                                   prior 0
        decoder  := d_1 .. d_(n-1), d_i in [1, 4]                   prior 2

    A derivation maps to ``TrialConfig(n_stages=k, encoder_type, blocks_per_stage_encoder=b_1..b_k,
    blocks_per_stage_decoder=d_1..d_(k-1), normalization, activation, dropout_rate, ...)``: the
    first k of the planner's stages (kernel sizes, strides) are kept. The decoder's normalization,
    activation and dropout are the encoder branch's: stock nnU-Net's PlainConvUNet and
    ResidualEncoderUNet take one norm/nonlin/dropout for the whole network, and a model must load
    in stock nnU-Net. The default derivation (k = n, conv, 2 convolutions per encoder and decoder
    stage, InstanceNorm, LeakyReLU, no dropout, 32..320 features) is exactly nnU-Net's default.

    With several ``configurations`` the grammar sits under the configuration choice (one branch
    per configuration, ``planned_stages`` then maps each to its planner's stage count): a 2d plan
    usually has more, smaller stages than a 3d one.
    """

    def __init__(self, *, planned_stages: Optional[Any] = None, **kwargs: Any):
        if planned_stages is None:
            raise ConfigError("the hpo_hnas space needs the planner's stage count (planned_stages)")
        super().__init__(planned_stages=planned_stages, **kwargs)

    def _parameters(self, prior, confidence, planned_stages, configurations):
        hpo = _hpo_parameters(prior, confidence)
        if len(configurations) > 1:
            if not isinstance(planned_stages, Mapping):
                raise ConfigError("an hpo_hnas space over several configurations needs each one's stage count "
                                  "(planned_stages as a mapping)")
            return {**hpo, **_hnas_branches(prior, confidence, configurations, planned_stages)}
        stages = planned_stages[configurations[0]] if isinstance(planned_stages, Mapping) else planned_stages
        return {**hpo, **_hnas_parameters(prior, confidence, int(stages)),
                **_configuration_parameter(prior, confidence, configurations)}


SPACES: dict[str, type[_AutoNNUNetSpace]] = {
    "hpo": HPOSpace,
    "hpo_nas": HPONASSpace,
    "hpo_hnas": HPOHNASSpace,
}


def build_space(
    name: SpaceName,
    *,
    min_epochs: int = DEFAULT_MIN_EPOCHS,
    max_epochs: int = DEFAULT_MAX_EPOCHS,
    prior_confidence: Confidence = "medium",
    prior: Optional[TrialConfig] = None,
    planned_stages: Optional[Any] = None,
    configurations: Optional[Sequence[str]] = None,
) -> neps.PipelineSpace:
    """The named space with fidelity ``epochs`` in ``[min_epochs, max_epochs]``.

    ``prior`` centres the space on another configuration (default: nnU-Net's). ``planned_stages``
    (the plans' stage count; a mapping configuration -> count with several ``configurations``)
    is required for ``hpo_hnas`` and ignored otherwise. ``configurations``: nnU-Net
    configurations to choose among (default: the prior's alone).
    """
    try:
        cls = SPACES[name]
    except KeyError:
        raise ConfigError(f"unknown search space {name!r}; expected one of {', '.join(SPACES)}") from None
    kwargs: dict[str, Any] = dict(
        min_epochs=min_epochs, max_epochs=max_epochs, prior_confidence=prior_confidence, prior=prior,
        configurations=configurations,
    )
    if cls is HPOHNASSpace:
        kwargs["planned_stages"] = planned_stages
    return cls(**kwargs)


def planned_stage_count(plans: Mapping[str, Any], configuration: str = "3d_fullres") -> int:
    """The number of resolution stages nnU-Net's planner chose (what ``hpo_hnas`` needs)."""
    return int(plans["configurations"][configuration]["architecture"]["arch_kwargs"]["n_stages"])


# --------------------------------------------------------------------------------------------
# Mapping
# --------------------------------------------------------------------------------------------


def trial_config_from_values(values: Mapping[str, Any]) -> tuple[TrialConfig, Optional[int]]:
    """Resolved pipeline attributes (what NePS passes to the evaluation function) -> config, epochs.

    Values that are dicts (results of grammar operators) are merged into the flat field set; the
    HNAS block lists are cut to the chosen number of stages.
    """
    flat: dict[str, Any] = {}
    epochs = None
    for name, value in values.items():
        if name == FIDELITY:
            epochs = int(value)
        elif isinstance(value, Mapping):
            flat.update(value)
        else:
            flat[name] = value
    if "n_stages" in flat and flat["n_stages"] is not None:
        k = int(flat["n_stages"])
        if flat.get("blocks_per_stage_encoder") is not None:
            flat["blocks_per_stage_encoder"] = list(flat["blocks_per_stage_encoder"])[:k]
        if flat.get("blocks_per_stage_decoder") is not None:
            flat["blocks_per_stage_decoder"] = list(flat["blocks_per_stage_decoder"])[: k - 1]
    for name in ("base_num_features", "max_features", "model_scale", "n_stages"):
        if flat.get(name) is not None:
            flat[name] = int(flat[name])
    for name in ("momentum", "initial_lr", "weight_decay", "oversample_foreground_percent", "aug_factor", "dropout_rate"):
        if flat.get(name) is not None:
            flat[name] = float(flat[name])
    return TrialConfig.from_dict(flat), epochs


def resolve_values(space: neps.PipelineSpace, neps_config: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve a stored NePS config against ``space`` into plain attribute values."""
    from .neps_adapter import resolve_config

    return resolve_config(space, neps_config)


def config_from_neps(space: neps.PipelineSpace, neps_config: Mapping[str, Any]) -> tuple[TrialConfig, Optional[int]]:
    """A trial's NePS config (``SAMPLING__...`` keys) -> ``(TrialConfig, epochs)``."""
    return trial_config_from_values(resolve_values(space, neps_config))


def neps_config_from_trial(
    name: SpaceName,
    config: TrialConfig,
    epochs: int,
    *,
    min_epochs: int = DEFAULT_MIN_EPOCHS,
    max_epochs: int = DEFAULT_MAX_EPOCHS,
    planned_stages: Optional[Any] = None,
    configurations: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """``TrialConfig`` -> the NePS config that the named space maps back to it.

    Fields a space does not search are not represented (they take nnU-Net's defaults when mapped
    back). Raises :class:`ConfigError` when a searched value lies outside the space.
    """
    from .neps_adapter import prior_sample_config

    space = build_space(
        name, min_epochs=min_epochs, max_epochs=max_epochs, prior=config, planned_stages=planned_stages,
        configurations=configurations,
    )
    # Centred on ``config``, the space's prior sample is ``config`` itself.
    return prior_sample_config(space, {FIDELITY: int(epochs)})


_SAMPLING_RE = re.compile(r"^(?:config\.)?SAMPLING__Resolvable\.(?P<path>.*?)::(?P<kind>[a-z]+)__.*$")


def plain_name(column: str) -> str:
    """A NePS config column (``config.SAMPLING__Resolvable.<path>::<domain>``) -> a readable path.

    >>> plain_name("config.SAMPLING__Resolvable.initial_lr::float__1e-05_0.1_True")
    'initial_lr'
    >>> plain_name("SAMPLING__Resolvable.encoder.sampled_value.kwargs.mapping_value{blocks}.args.sequence[1]::integer__1_6_False")
    'encoder.blocks[1]'
    >>> plain_name("config.ENVIRONMENT__epochs")
    'epochs'
    """
    name = column[len("config.") :] if column.startswith("config.") else column
    if name.startswith("ENVIRONMENT__"):
        return name[len("ENVIRONMENT__") :]
    match = _SAMPLING_RE.match(column)
    if not match:
        return column
    path = match.group("path")
    path = path.replace(".sampled_value", "").replace(".kwargs.mapping_value{", ".").replace("}", "")
    path = re.sub(r"\.args\.sequence\[(\d+)\]", r"[\1]", path)
    if match.group("kind") == "categorical" and not path.endswith("]"):
        path += "#choice"  # the stored value is the index of the chosen option
    return path
