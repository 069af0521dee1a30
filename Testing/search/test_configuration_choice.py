"""nnU-Net's configuration (2d / 3d_fullres / 3d_lowres) as a searched choice, on the planned hippocampus.

The hippocampus plans hold 2d and 3d_fullres (no 3d_lowres: the images are small); the session
workspace preprocessed 3d_fullres only, so a copy gets its 2d data preprocessed here (the real
nnU-Net preprocessor). Training is one epoch of one iteration, validation one case.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from AutoNNUNetLib.config import ConfigurationNotPlanned, TrialConfig
from AutoNNUNetLib.errors import UserInputError
from AutoNNUNetLib.states import TrialState
from AutoNNUNetLib.workspace import Workspace


@pytest.fixture(scope="module")
def hippo_2d(hippo_workspace, tmp_path_factory) -> Workspace:
    """A copy of the planned hippocampus workspace with its 2d configuration preprocessed too, by
    the command a job's preprocess step runs (``fingerprint --missing-only``)."""
    from AutoNNUNetLib import cli

    root = tmp_path_factory.mktemp("hippo_2d")
    for part in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(hippo_workspace.root / part, root / part)
    workspace = Workspace(root, hippo_workspace.require_dataset())
    plans = workspace.plans_file.read_bytes()
    assert cli.main(["fingerprint", "--workdir", str(root), "--configurations", "2d", "3d_lowres", "--missing-only",
                     "--processes", "2"]) == 0
    assert workspace.plans_file.read_bytes() == plans  # never re-planned
    return workspace


def test_missing_only_preprocesses_the_planned_missing_ones_once(hippo_workspace, hippo_2d, capsys):
    from AutoNNUNetLib.fingerprint import FingerprintError, preprocess_missing

    plans = hippo_2d.load_plans()
    cases = sorted(p.name for p in (hippo_2d.preprocessed_dataset / plans["configurations"]["3d_fullres"]
                                    ["data_identifier"]).iterdir())
    two_d = hippo_2d.preprocessed_dataset / plans["configurations"]["2d"]["data_identifier"]
    assert sorted(p.name for p in two_d.iterdir()) == cases  # every case, in nnU-Net's own file names
    # Now all there: nothing to do; 3d_lowres (not planned for these small images) is skipped, not an error.
    assert preprocess_missing(hippo_2d, ["2d", "3d_fullres", "3d_lowres"]) == []
    from AutoNNUNetLib import cli

    assert cli.main(["fingerprint", "--workdir", str(hippo_2d.root), "--configurations", "2d", "--missing-only"]) == 0
    assert "nothing to preprocess" in capsys.readouterr().out
    with pytest.raises(FingerprintError, match="plan the dataset first"):
        preprocess_missing(Workspace(hippo_2d.root / "nowhere", hippo_2d.require_dataset()), ["2d"])


def test_unplanned_or_unpreprocessed_configurations_are_refused_by_name(hippo_workspace, hippo_2d, tmp_path, capsys):
    from AutoNNUNetLib import cli
    from AutoNNUNetLib.search import SearchSettings, run_search
    from AutoNNUNetLib.trainer import train

    with pytest.raises(ConfigurationNotPlanned, match=r"'3d_lowres' is not planned for this dataset "
                                                      r"\(planned: 2d, 3d_fullres\)") as caught:
        train(hippo_2d, TrialConfig(configuration="3d_lowres"), tmp_path / "m", epochs=1, device="cpu")
    assert isinstance(caught.value, UserInputError)
    assert not (tmp_path / "m").exists()  # refused before anything was written
    # the session workspace planned 2d but preprocessed only 3d_fullres
    with pytest.raises(ConfigurationNotPlanned, match="'2d' is planned but not preprocessed"):
        run_search(hippo_workspace, tmp_path / "root", SearchSettings.from_profile(
            "quick", configurations=["2d", "3d_fullres"], device="cpu", max_trials=1))
    assert not (tmp_path / "root" / "neps").exists()
    code = cli.main(["search", "--workdir", str(hippo_2d.root), "--root", str(tmp_path / "r2"), "--profile", "quick",
                     "--configurations", "3d_fullres,3d_lowres", "--max-trials", "1", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "'3d_lowres' is not planned" in err and "Traceback" not in err


def test_a_2d_trial_config_builds_a_2d_network_and_trains(hippo_2d, tmp_path):
    import torch

    from AutoNNUNetLib.network import build_network
    from AutoNNUNetLib.trainer import TrainingError, model_dir_name, train

    plans, dataset_json = hippo_2d.load_plans(), hippo_2d.load_dataset_json()
    patch = plans["configurations"]["2d"]["patch_size"]
    assert len(patch) == 2
    # searched architecture choices apply to 2d as well: residual encoder, BatchNorm, dropout, 3 stages
    searched = TrialConfig(configuration="2d", encoder_type="residual", normalization="BatchNorm", dropout_rate=0.2,
                           n_stages=3, blocks_per_stage_encoder=[1, 2, 2], blocks_per_stage_decoder=[1, 1])
    for config in (TrialConfig(configuration="2d"), searched):
        network = build_network(plans, dataset_json, config, deep_supervision=False).eval()
        convs = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d)]
        assert not convs and any(isinstance(m, torch.nn.Conv2d) for m in network.modules())
        with torch.no_grad():
            assert network(torch.randn(2, 1, *patch)).shape == (2, 3, *patch)

    config = TrialConfig(configuration="2d", initial_lr=0.02)
    model_dir = tmp_path / model_dir_name(config.configuration)
    result = train(hippo_2d, config, model_dir, folds=[0], epochs=1, max_epochs=2, iterations_per_epoch=1,
                   device="cpu", seed=0, max_validation_cases=1)
    assert model_dir.name == "nnUNetTrainer__nnUNetPlans__2d"
    assert set(result.dice_per_class) == {"Anterior", "Posterior"}
    assert all(0.0 <= v <= 1.0 for v in result.dice_per_class.values())
    record = json.loads((model_dir / "autonnunet.json").read_text())
    assert record["configuration"] == "2d" and record["config"]["configuration"] == "2d"
    stored = json.loads((model_dir / "plans.json").read_text())["configurations"]["2d"]["architecture"]
    assert stored["arch_kwargs"]["conv_op"] == "torch.nn.modules.conv.Conv2d"
    checkpoint = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["init_args"]["configuration"] == "2d"
    assert checkpoint["autonnunet"]["config"]["configuration"] == "2d"
    # the same hyperparameters in 3d_fullres are another training: the 2d checkpoint is not continued
    with pytest.raises(TrainingError, match="another configuration"):
        train(hippo_2d, config, tmp_path / "3d", folds=[0], epochs=2, max_epochs=2, iterations_per_epoch=1,
              device="cpu", resume_from=model_dir, configuration="3d_fullres")


def test_same_hyperparameters_in_another_configuration_are_not_reused(tmp_path):
    from AutoNNUNetLib.search.records import TrialRecord, write_trial_record
    from AutoNNUNetLib.search.trial import TrainingIndex, config_key

    old_record = {k: v for k, v in TrialConfig().to_dict().items() if k != "configuration"}
    assert config_key(old_record) == config_key(TrialConfig().to_dict())  # records from before the field
    assert config_key(TrialConfig(configuration="2d").to_dict()) != config_key(TrialConfig().to_dict())
    trial_dir = tmp_path / "neps" / "configs" / "config_1_0"
    write_trial_record(trial_dir, TrialRecord(
        trial_id="1_0", config_id=1, rung=0, epochs=3, state=TrialState.SUCCEEDED,
        config=TrialConfig().to_dict(), mean_dice=0.5, epochs_trained=3,
        validations=[{"epochs": 3, "mean_dice": 0.5}]))
    index = TrainingIndex.scan(tmp_path, [0])
    assert index.validation(config_key(TrialConfig().to_dict()), 3) is not None
    assert index.validation(config_key(TrialConfig(configuration="2d").to_dict()), 3) is None


def _fake_trainer(calls: list):
    """Stands in for nnU-Net training (the control flow of the search is tested, not learning):
    writes the fold checkpoint files the search looks for; 2d scores better than 3d_fullres."""
    def train(workspace, config, output_dir, *, folds, epochs, progress=None, resume_from=None, **_):
        calls.append((config.configuration, Path(output_dir).name, epochs, resume_from is not None))
        for fold in folds:
            (Path(output_dir) / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"fake")
        (Path(output_dir) / "autonnunet.json").write_text(json.dumps({"configuration": config.configuration,
                                                                     "config": config.to_dict()}))
        dice = (0.6 if config.configuration == "2d" else 0.5) + 0.01 * epochs
        fold = SimpleNamespace(validation_seconds=0.1, epochs_trained=epochs)
        return SimpleNamespace(folds=[fold], train_seconds=0.1 * epochs, mean_dice=dice, epochs=epochs,
                               dice_per_class={"Anterior": dice, "Posterior": dice}, diverged=None)
    return train


def test_a_search_over_2d_and_3d_fullres_trains_each_trial_in_its_configuration(hippo_2d, tmp_path):
    from AutoNNUNetLib.search import SearchSettings, run_search
    from AutoNNUNetLib.selection.candidates import candidates_from_search

    calls: list = []
    settings = SearchSettings.from_profile("quick", configurations=["2d", "3d_fullres"], prior_confidence="low",
                                           min_epochs=1, max_epochs=4, eta=2, max_trials=8, device="cpu", seed=3)
    results = run_search(hippo_2d, tmp_path / "root", settings, trainer=_fake_trainer(calls))
    trained = [t for t in results.trials if t.state == TrialState.SUCCEEDED]
    assert len(trained) == 8
    configurations = {t.config["configuration"] for t in trained}
    assert configurations == {"2d", "3d_fullres"}  # the choice is really searched
    for trial in trained:  # each trial's model folder is named after its own configuration
        assert Path(trial.model_dir).name == f"nnUNetTrainer__nnUNetPlans__{trial.config['configuration']}"
    assert {c[0] for c in calls} == configurations and all(c[1].endswith("__" + c[0]) for c in calls)
    best = results.best.config["configuration"]  # 2d, unless no 2d trial reached the top rung
    assert Path(results.incumbent_model_dir).name == f"nnUNetTrainer__nnUNetPlans__{best}"
    # the selection's candidates honour it: the incumbent in its own configuration, its
    # hyperparameters in the other one (3d_fullres competes with a 2d incumbent too)
    other = {"2d": "3d_fullres", "3d_fullres": "2d"}[best]
    chosen = candidates_from_search(tmp_path / "root", top=0, workspace=hippo_2d)
    assert [(c.name, c.configuration, c.config.configuration) for c in chosen] == [
        ("incumbent", best, best), (f"incumbent{other.replace('_', '')}", other, other)]
    assert chosen[0].folder_name == f"nnUNetTrainer__nnUNetPlans_incumbent__{best}"
    assert chosen[1].config.replace(configuration=best) == chosen[0].config
