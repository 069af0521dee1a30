"""Patch and batch size of a searched network follow nnU-Net's memory rule (network.fit_patch_and_batch)."""

from __future__ import annotations

import math

import pytest

from AutoNNUNetLib.config import TrialConfig
from AutoNNUNetLib.network import (
    apply_config_to_plans, architecture_kwargs, build_network, feature_map_size, fit_patch_and_batch,
)

BIG = TrialConfig(base_num_features=64, max_features=640, model_scale=3)
SMALL = TrialConfig(base_num_features=16, max_features=160, model_scale=0)


@pytest.fixture(scope="module")
def planned(hippo_workspace):
    return hippo_workspace.load_plans(), hippo_workspace.load_dataset_json()


def _uncapped(dataset_json: dict) -> dict:
    """The same dataset with many more cases: the 5%-of-the-dataset batch cap no longer binds."""
    return {**dataset_json, "numTraining": 100_000}


def test_estimate_is_nnunets_own(planned, monkeypatch):
    # nnU-Net's estimate sets torch's thread count to nnUNet_n_proc_DA; the tests' 0 would fail there.
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    plans, dataset_json = planned
    entry = plans["configurations"]["3d_fullres"]
    arch = entry["architecture"]
    ours = feature_map_size(arch["network_class_name"], arch["arch_kwargs"], entry["patch_size"], 1, 3)
    theirs = ExperimentPlanner.static_estimate_VRAM_usage(
        tuple(entry["patch_size"]), 1, 3, arch["network_class_name"], arch["arch_kwargs"],
        tuple(arch["_kw_requires_import"]))
    assert ours == pytest.approx(float(theirs)) and ours > 0


def test_default_network_keeps_the_planned_patch_and_batch(planned):
    plans, dataset_json = planned
    new = apply_config_to_plans(plans, TrialConfig(), dataset_json=_uncapped(dataset_json))
    for key in ("patch_size", "batch_size"):
        assert new["configurations"]["3d_fullres"][key] == plans["configurations"]["3d_fullres"][key]


def test_hippocampus_batch_is_capped_at_five_percent_of_the_data(planned):
    # 60 small volumes: two patches already cover 5% of the voxels, so every network gets batch 2.
    plans, dataset_json = planned
    for config in (BIG, SMALL):
        entry = apply_config_to_plans(plans, config, dataset_json=dataset_json)["configurations"]["3d_fullres"]
        assert entry["batch_size"] == 2 and entry["patch_size"] == plans["configurations"]["3d_fullres"]["patch_size"]


def test_bigger_networks_get_smaller_batches(planned):
    plans, dataset_json = planned
    dataset_json = _uncapped(dataset_json)
    fits = {}
    for name, config in (("small", SMALL), ("default", TrialConfig()),
                         ("big", BIG)):
        class_name, kwargs = architecture_kwargs(plans, config)
        fits[name] = fit_patch_and_batch(plans, dataset_json, class_name, kwargs)
    assert fits["small"].batch_size > fits["default"].batch_size > fits["big"].batch_size >= 2
    for fit in fits.values():
        # the largest batch within the budget: one more sample would not fit
        assert fit.batch_size == round(fit.budget / fit.feature_map_size * 2)


def test_patch_shrinks_when_two_samples_do_not_fit(planned):
    plans, dataset_json = planned
    entry = plans["configurations"]["3d_fullres"]
    class_name, kwargs = architecture_kwargs(plans, BIG)
    fit = fit_patch_and_batch(plans, _uncapped(dataset_json), class_name, kwargs, gpu_memory_gb=0.5)
    divisor = [math.prod(s[axis] for s in kwargs["strides"]) for axis in range(3)]
    assert math.prod(fit.patch_size) < math.prod(entry["patch_size"])
    assert fit.batch_size == 2 and fit.feature_map_size <= fit.budget  # two samples fit now
    for size, div, planned_size in zip(fit.patch_size, divisor, entry["patch_size"]):
        assert size % div == 0 and size // div >= 4 and size <= planned_size
    # The searched network runs on the new patch and segments all of it.
    import torch

    network = build_network(plans, dataset_json, BIG, deep_supervision=False).eval()
    with torch.no_grad():
        out = network(torch.zeros(1, 1, *fit.patch_size))
    assert tuple(out.shape) == (1, 3, *fit.patch_size)
