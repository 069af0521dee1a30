"""The Auto-nnU-Net search spaces: ranges, nnU-Net-default priors, mapping, and trainable samples."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

neps = pytest.importorskip("neps")

from AutoNNUNetLib.config import TrialConfig  # noqa: E402
from AutoNNUNetLib.search.space import (  # noqa: E402
    FIDELITY,
    SPACES,
    build_space,
    config_from_neps,
    neps_config_from_trial,
    plain_name,
    trial_config_from_values,
)

PLANNED_STAGES = 4  # hippocampus: 4 stages, 32..256 features

# DESIGN.md section 3: name -> (lower, upper, log, prior) for numbers, (choices, prior) for categoricals.
HPO_NUMBERS = {
    "initial_lr": (1e-5, 1e-1, True, 1e-2),
    "weight_decay": (1e-6, 1e-2, True, 3e-5),
    "oversample_foreground_percent": (0.0, 1.0, False, 0.33),
    "aug_factor": (0.0, 3.0, False, 1.0),
}
HPO_CATEGORICALS = {
    "lr_scheduler": (("PolyLR", "CosineAnnealing", "none"), "PolyLR"),
    "loss": (("Dice", "Dice+CE", "CE", "TopK10"), "Dice+CE"),
}
NAS_NUMBERS = {
    "model_scale": (0, 3, False, 1),
    "base_num_features": (16, 64, False, 32),
    "max_features": (160, 640, False, 320),
    "dropout_rate": (0.0, 0.5, False, 0.0),
}
NAS_CATEGORICALS = {
    "encoder_type": (("conv", "residual"), "conv"),
    "activation": (("LeakyReLU", "ReLU", "ELU", "GELU", "PReLU"), "LeakyReLU"),
    "normalization": (("InstanceNorm", "BatchNorm"), "InstanceNorm"),
}


def _space(name, **kwargs):
    return build_space(name, min_epochs=1, max_epochs=9, planned_stages=PLANNED_STAGES, **kwargs)


def _check_number(param, lower, upper, log, prior, confidence="medium"):
    assert (param.lower, param.upper) == (lower, upper)
    assert bool(getattr(param, "_log", False)) == log
    assert param.prior == pytest.approx(prior)
    assert param.prior_confidence.value == confidence


def _check_categorical(param, choices, prior, confidence="medium"):
    assert tuple(param.choices) == choices
    assert param.prior == choices.index(prior)  # NePS 0.17: a categorical prior is an index
    assert param.prior_confidence.value == confidence


@pytest.mark.parametrize("name", list(SPACES))
def test_hpo_ranges_and_priors(name):
    attrs = _space(name).get_attrs()
    for key, spec in HPO_NUMBERS.items():
        _check_number(attrs[key], *spec)
    for key, spec in HPO_CATEGORICALS.items():
        _check_categorical(attrs[key], *spec)
    optimizer = attrs["optimizer"]
    assert optimizer.prior == 0 and len(optimizer.choices) == 3
    names = [choice.kwargs["name"] for choice in optimizer.choices]
    assert names == ["SGD", "Adam", "AdamW"]
    # momentum exists only under SGD, log-scaled 0.5..0.999 with prior 0.99
    _check_number(optimizer.choices[0].kwargs["momentum"], 0.5, 0.999, True, 0.99)
    assert all("momentum" not in choice.kwargs for choice in optimizer.choices[1:])
    fidelity = attrs[FIDELITY]
    assert isinstance(fidelity, neps.IntegerFidelity)
    assert (fidelity.lower, fidelity.upper) == (1, 9)


def test_nas_ranges_and_priors():
    attrs = _space("hpo_nas").get_attrs()
    for key, spec in NAS_NUMBERS.items():
        _check_number(attrs[key], *spec)
    for key, spec in NAS_CATEGORICALS.items():
        _check_categorical(attrs[key], *spec)


def test_hnas_grammar_ranges_and_priors():
    attrs = _space("hpo_hnas").get_attrs()
    _check_number(attrs["n_stages"], 2, PLANNED_STAGES, False, PLANNED_STAGES)
    _check_number(attrs["base_num_features"], 16, 64, False, 32)
    _check_number(attrs["max_features"], 160, 640, False, 320)
    encoder = attrs["encoder"]
    assert encoder.prior == 0
    conv, residual = encoder.choices
    for branch, defaults in ((conv, [2, 2, 2, 2]), (residual, [1, 3, 4, 6])):
        blocks = branch.kwargs["blocks"].args
        assert [b.prior for b in blocks] == defaults
        assert [(b.lower, b.upper) for b in blocks] == [(1, 2 * d) for d in defaults]
        _check_categorical(branch.kwargs["normalization"], *NAS_CATEGORICALS["normalization"])
        _check_categorical(branch.kwargs["activation"], *NAS_CATEGORICALS["activation"])
        _check_number(branch.kwargs["dropout_rate"], *NAS_NUMBERS["dropout_rate"])
    decoder = attrs["decoder"].kwargs["blocks"].args
    assert [(d.lower, d.upper, d.prior) for d in decoder] == [(1, 4, 2)] * (PLANNED_STAGES - 1)


@pytest.mark.parametrize("confidence", ["low", "high"])
def test_prior_confidence_is_selectable(confidence):
    attrs = _space("hpo_nas", prior_confidence=confidence).get_attrs()
    assert attrs["initial_lr"].prior_confidence.value == confidence
    assert attrs["activation"].prior_confidence.value == confidence


def test_hnas_needs_the_stage_count():
    from AutoNNUNetLib.config import ConfigError

    with pytest.raises(ConfigError, match="planned_stages"):
        build_space("hpo_hnas")


@pytest.mark.parametrize("name", list(SPACES))
def test_prior_sample_is_nnunet_default(name):
    neps_config = neps_config_from_trial(name, TrialConfig(), 9, min_epochs=1, max_epochs=9,
                                         planned_stages=PLANNED_STAGES)
    config, epochs = config_from_neps(_space(name), neps_config)
    assert epochs == 9
    if name == "hpo_hnas":
        # the default derivation spells nnU-Net's default network out explicitly
        assert config.replace(n_stages=None, blocks_per_stage_encoder=None, blocks_per_stage_decoder=None) == TrialConfig()
        assert (config.n_stages, config.blocks_per_stage_encoder, config.blocks_per_stage_decoder) == (
            4, [2, 2, 2, 2], [2, 2, 2])
    else:
        assert config == TrialConfig()


@pytest.mark.parametrize("name", list(SPACES))
def test_config_roundtrip(name):
    space = _space(name)
    random.seed(3)
    np.random.seed(3)
    for _ in range(40):
        neps_config, values = space.sample({FIDELITY: 3})
        config, epochs = trial_config_from_values(values)
        assert epochs == 3
        assert config_from_neps(space, neps_config) == (config, 3)
        back = neps_config_from_trial(name, config, 3, min_epochs=1, max_epochs=9, planned_stages=PLANNED_STAGES)
        assert config_from_neps(space, back) == (config, 3)
        if name == "hpo_hnas":
            k = config.n_stages
            assert 2 <= k <= PLANNED_STAGES
            assert len(config.blocks_per_stage_encoder) == k and len(config.blocks_per_stage_decoder) == k - 1


# --------------------------------------------------------------------------------------------
# nnU-Net's configuration as a searched choice

BOTH = ("2d", "3d_fullres")
STAGES = {"2d": 5, "3d_fullres": PLANNED_STAGES}  # a 2d plan with one stage more than the 3d one


@pytest.mark.parametrize("name", list(SPACES))
def test_configuration_choice_prior_and_samples(name):
    stages = STAGES if name == "hpo_hnas" else None
    space = build_space(name, min_epochs=1, max_epochs=9, planned_stages=stages, configurations=BOTH)
    if name != "hpo_hnas":
        _check_categorical(space.configuration, BOTH, "3d_fullres")
    else:
        assert len(space.configuration.choices) == 2 and space.configuration.prior == 1
    prior = config_from_neps(space, neps_config_from_trial(name, TrialConfig(), 9, min_epochs=1, max_epochs=9,
                                                           planned_stages=stages, configurations=BOTH))[0]
    assert prior.configuration == "3d_fullres"
    if name == "hpo_hnas":
        assert (prior.n_stages, prior.blocks_per_stage_encoder) == (PLANNED_STAGES, [2] * PLANNED_STAGES)
    else:
        assert prior == TrialConfig()
    random.seed(5)
    np.random.seed(5)
    seen = Counter()
    for _ in range(40):
        neps_config, values = space.sample({FIDELITY: 3})
        config, _ = trial_config_from_values(values)
        seen[config.configuration] += 1
        assert config_from_neps(space, neps_config) == (config, 3)
        back = neps_config_from_trial(name, config, 3, min_epochs=1, max_epochs=9, planned_stages=stages,
                                      configurations=BOTH)
        assert config_from_neps(space, back) == (config, 3)
        if name == "hpo_hnas":  # each configuration's grammar has its own planner's stage count
            n = STAGES[config.configuration]
            assert math.ceil(n / 2) <= config.n_stages <= n
            assert len(config.blocks_per_stage_encoder) == config.n_stages
    assert set(seen) == set(BOTH)


def test_configuration_default_space_is_unchanged_and_single_choices_are_constants():
    from AutoNNUNetLib.config import ConfigError

    # only 3d_fullres: no parameter at all, so the spaces (and NePS states) of earlier searches stay valid
    assert not hasattr(_space("hpo"), "configuration")
    assert not hasattr(_space("hpo", configurations=("3d_fullres",)), "configuration")
    assert set(neps_config_from_trial("hpo", TrialConfig(), 3, min_epochs=1, max_epochs=9)) == set(
        neps_config_from_trial("hpo", TrialConfig(), 3, min_epochs=1, max_epochs=9, configurations=("3d_fullres",)))
    only_2d = _space("hpo_nas", prior=TrialConfig(configuration="2d"), configurations=("2d",))
    assert only_2d.configuration == "2d"
    _, values = only_2d.sample({FIDELITY: 2})
    assert trial_config_from_values(values)[0].configuration == "2d"
    with pytest.raises(ConfigError, match="configuration = '3d_fullres' is not in the search space"):
        _space("hpo", configurations=("2d", "3d_lowres"))
    with pytest.raises(ConfigError, match="'4d' is not one of"):
        _space("hpo", configurations=("3d_fullres", "4d"))
    with pytest.raises(ConfigError, match="stage count"):
        build_space("hpo_hnas", min_epochs=1, max_epochs=9, planned_stages=4, configurations=BOTH)
    with pytest.raises(ConfigError, match="configuration = '4d'"):
        TrialConfig(configuration="4d").validate()


def test_plain_names():
    assert plain_name("config.SAMPLING__Resolvable.initial_lr::float__1e-05_0.1_True") == "initial_lr"
    assert plain_name("config.ENVIRONMENT__epochs") == "epochs"
    assert plain_name("SAMPLING__Resolvable.optimizer.sampled_value.kwargs.mapping_value{momentum}"
                      "::float__0.5_0.999_True") == "optimizer.momentum"
    assert plain_name("SAMPLING__Resolvable.decoder.sampled_value.kwargs.mapping_value{blocks}"
                      ".args.sequence[2]::integer__1_4_False") == "decoder.blocks[2]"
    assert plain_name("config.SAMPLING__Resolvable.configuration::categorical__2") == "configuration#choice"
    assert plain_name("SAMPLING__Resolvable.configuration.sampled_value.kwargs.mapping_value{encoder}.sampled_value"
                      ".kwargs.mapping_value{blocks}.args.sequence[1]::integer__1_4_False") == \
        "configuration.encoder.blocks[1]"


# --------------------------------------------------------------------------------------------
# every sampled configuration builds a network that trains


def _tiny_plans(plans: dict) -> dict:
    """The hippocampus plans with the smallest patch the planned strides allow (fast passes)."""
    import copy

    plans = copy.deepcopy(plans)
    conf = plans["configurations"]["3d_fullres"]
    strides = conf["architecture"]["arch_kwargs"]["strides"]
    # twice the total downsampling: the bottleneck keeps 2 voxels per axis (InstanceNorm needs > 1)
    conf["patch_size"] = [2 * int(np.prod([s[axis] for s in strides])) for axis in range(len(strides[0]))]
    return plans


@pytest.mark.parametrize("name", list(SPACES))
def test_random_samples_build_and_train(name, hippo_workspace):
    import torch

    from AutoNNUNetLib.network import build_network
    from AutoNNUNetLib.search.space import planned_stage_count

    plans = _tiny_plans(hippo_workspace.load_plans())
    dataset_json = hippo_workspace.load_dataset_json()
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    stages = planned_stage_count(plans)
    space = build_space(name, min_epochs=1, max_epochs=9, planned_stages=stages)
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(0)
    seen = set()
    # HPO samples all share the planned network, so a few suffice; NAS/HNAS samples vary it.
    n_samples = 6 if name == "hpo" else 14
    for i in range(n_samples):
        if i == 0:  # the prior itself
            config = config_from_neps(space, neps_config_from_trial(
                name, TrialConfig(), 1, min_epochs=1, max_epochs=9, planned_stages=stages))[0]
        else:
            _, values = space.sample({FIDELITY: 1})
            config, _ = trial_config_from_values(values)
        network = build_network(plans, dataset_json, config, deep_supervision=True)
        network.train()
        x = torch.randn(1, 1, *patch)
        outputs = network(x)  # deep supervision: one output per decoder resolution, full size first
        assert outputs[0].shape == (1, 3, *patch), config
        loss = sum(out.float().square().mean() for out in outputs)
        loss.backward()
        assert math.isfinite(loss.item()), config
        grads = [p.grad for p in network.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), config
        seen.add((config.encoder_type, config.normalization, config.activation, config.n_stages))
    if name != "hpo":
        assert len(seen) > 3  # the samples really vary the network
