"""The portfolio warm start: the reference's incumbents as valid TrialConfigs, leave-one-dataset-out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from AutoNNUNetLib.config import TrialConfig
from AutoNNUNetLib.search.portfolio import config_from_entry, portfolio, project, task_name
from AutoNNUNetLib.search.reference_incumbents import ENTRIES

SHARED_PORTFOLIO = Path(__file__).resolve().parents[3] / "shared" / "portfolio" / "reference_incumbents.json"


def test_packaged_entries_are_the_published_ones():
    if not SHARED_PORTFOLIO.is_file():
        pytest.skip("../shared/portfolio not found")
    published = json.loads(SHARED_PORTFOLIO.read_text())["incumbents"]
    assert [dict(e) for e in ENTRIES] == published


def test_every_entry_maps_to_a_valid_config():
    assert len(ENTRIES) == 30
    configs = [config_from_entry(e) for e in ENTRIES]
    for entry, config in zip(ENTRIES, configs):
        hp = entry["hp_config"]
        for name in ("initial_lr", "aug_factor", "weight_decay", "optimizer", "oversample_foreground_percent"):
            assert getattr(config, name) == hp.get(name, getattr(TrialConfig(), name))
        if entry["space"] == "hpo_nas":
            assert config.base_num_features == hp.get("base_num_features", 32)
            assert config.encoder_type in ("conv", "residual")
    assert {c.loss for c in configs} == {"Dice", "CE", "Dice+CE", "TopK10"}
    assert {c.lr_scheduler for c in configs} == {"PolyLR", "CosineAnnealing", "none"}


def test_the_searched_dataset_is_left_out_by_name():
    assert task_name("Dataset001_Hippocampus") == task_name("Task04_Hippocampus") == "hippocampus"
    hippocampus = [config_from_entry(e) for e in ENTRIES if e["dataset"] == "Dataset004_Hippocampus"]
    assert len(hippocampus) == 3
    for space in ("hpo", "hpo_nas", "hpo_hnas"):
        chosen = portfolio(space, "Dataset001_Hippocampus")
        assert chosen and TrialConfig() not in chosen
        assert all(project(config, space) not in chosen for config in hippocampus)
        # searched on another dataset, the hippocampus incumbents are candidates
        assert any(project(config, space) in portfolio(space, "Dataset002_Heart") for config in hippocampus)
    # an hpo search takes only hyperparameters: the network stays nnU-Net's
    assert all(c.base_num_features == 32 and c.encoder_type == "conv" for c in portfolio("hpo", "Hippocampus"))


def test_every_entry_builds_a_network_that_trains_a_step(hippo_workspace):
    import torch

    from AutoNNUNetLib.network import apply_config_to_plans, build_network

    plans, dataset_json = hippo_workspace.load_plans(), hippo_workspace.load_dataset_json()
    seen = set()
    for entry in ENTRIES:
        config = config_from_entry(entry)
        new_plans = apply_config_to_plans(plans, config, "3d_fullres", dataset_json)
        architecture = json.dumps(new_plans["configurations"]["3d_fullres"]["architecture"], sort_keys=True)
        if architecture in seen:
            continue  # same network as an entry already stepped
        seen.add(architecture)
        patch = new_plans["configurations"]["3d_fullres"]["patch_size"]
        network = build_network(plans, dataset_json, config, deep_supervision=False)
        optimizer = torch.optim.SGD(network.parameters(), lr=config.initial_lr)
        before = [p.detach().clone() for p in network.parameters()]
        out = network(torch.randn(1, 1, *patch))
        loss = torch.nn.functional.cross_entropy(out, torch.randint(0, 3, (1, *patch)))
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        assert any(not torch.equal(a, b) for a, b in zip(before, network.parameters()))
    assert len(seen) >= 10  # the NAS entries bring their own networks


def test_a_portfolio_entry_trains_with_nnunet(hippo_workspace, tmp_path):
    """One entry through the real trainer (its loss, optimizer and schedule), one iteration."""
    from AutoNNUNetLib.trainer import train

    entry = next(e for e in ENTRIES if e["hp_config"]["loss_function"] == "TopKLoss" and e["space"] == "hpo_nas")
    result = train(hippo_workspace, config_from_entry(entry), tmp_path / "model", folds=[0], epochs=1,
                   iterations_per_epoch=1, device="cpu", seed=0, max_validation_cases=1)
    assert result.epochs == 1 and 0.0 <= result.mean_dice <= 1.0
