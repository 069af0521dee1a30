"""Candidates from a search's results.json and the workspace's plans (no training)."""

from __future__ import annotations

import json

import pytest

from AutoNNUNetLib.config import TrialConfig
from AutoNNUNetLib.selection.candidates import (Candidate, candidates_from_search, skipped_configurations)
from AutoNNUNetLib.selection.layout import SelectionError
from AutoNNUNetLib.workspace import Workspace


def _trial(trial_id, dice, epochs=37, **config):
    return {"trial_id": trial_id, "config": TrialConfig(**config).to_dict(), "mean_dice": dice, "epochs": epochs,
            "state": "success", "model_dir": None}


@pytest.fixture()
def search(tmp_path):
    root = tmp_path / "search"
    root.mkdir()
    trials = [_trial("1_0", 0.80), _trial("1_1", 0.83, 111), _trial("2_0", 0.85, 111, initial_lr=0.02),
              _trial("3_0", 0.84, 111, base_num_features=16), _trial("4_0", 0.70, 111, loss="CE")]
    (root / "results.json").write_text(json.dumps({
        "trials": trials, "incumbent": "2_0", "pareto_front": ["1_1", "2_0", "3_0", "4_0", "1_0"]}))
    workspace = Workspace(tmp_path / "ws", "Dataset001_Demo")
    folder = workspace.preprocessed_dataset
    folder.mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps({"configurations": {
        "2d": {"data_identifier": "nnUNetPlans_2d"}, "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres"},
        "3d_lowres": {"data_identifier": "nnUNetPlans_3d_lowres"}}}))
    (folder / "nnUNetPlans_2d").mkdir()
    return root, workspace


def test_incumbent_top_pareto_points_and_planned_configurations(search):
    root, workspace = search
    chosen = candidates_from_search(root, top=2, workspace=workspace)
    assert [(c.name, c.origin, c.configuration) for c in chosen] == [
        ("incumbent", "incumbent", "3d_fullres"), ("pareto1", "pareto", "3d_fullres"),
        ("pareto2", "pareto", "3d_fullres"), ("incumbent2d", "configuration", "2d")]
    assert chosen[0].config.initial_lr == 0.02
    assert chosen[1].config.base_num_features == 16  # 0.84: next best Pareto point
    assert chosen[2].config == TrialConfig()  # 1_1 and 1_0 are one configuration: listed once
    # the incumbent's hyperparameters, in 2d: the config carries the candidate's configuration
    assert chosen[3].config == chosen[0].config.replace(configuration="2d")
    assert chosen[3].config.configuration == "2d" and chosen[0].config.configuration == "3d_fullres"
    assert chosen[3].folder_name == "nnUNetTrainer__nnUNetPlans_incumbent__2d"
    assert skipped_configurations(workspace) == {"3d_lowres": "planned but not preprocessed"}
    assert Candidate.from_dict(chosen[1].to_dict()).to_dict() == chosen[1].to_dict()


def test_no_incumbent_and_bad_names_are_errors(search, tmp_path):
    root, _ = search
    data = json.loads((root / "results.json").read_text())
    data["incumbent"] = None
    (root / "results.json").write_text(json.dumps(data))
    with pytest.raises(SelectionError, match="no incumbent"):
        candidates_from_search(root)
    with pytest.raises(SelectionError, match="results.json"):
        candidates_from_search(tmp_path / "nowhere")
    with pytest.raises(SelectionError, match="letters and digits"):
        Candidate("my__model", TrialConfig())
