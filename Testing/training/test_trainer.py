"""The configurable trainer: real nnU-Net training on the hippocampus cases (CPU, tiny budgets)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from AutoNNUNetLib.cli import main as cli_main
from AutoNNUNetLib.config import ConfigError, TrialConfig
from AutoNNUNetLib.errors import UserInputError
from AutoNNUNetLib.network import build_network
from AutoNNUNetLib.trainer import (
    CHECKPOINT_KEY,
    PolyLR,
    TrainingError,
    model_dir_name,
    parse_folds,
    scale_augmentation_probabilities,
    train,
)

#: A small network keeps the resume test fast; resuming does not depend on the architecture.
SMALL = TrialConfig(base_num_features=8, max_features=64)


def _checkpoint(model_dir: Path, fold: int = 0) -> dict:
    return torch.load(model_dir / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)


def test_default_configuration_learns_both_hippocampus_classes(trained_result, trained_model):
    # A short budget of nnU-Net's default must already segment both structures.
    assert set(trained_result.dice_per_class) == {"Anterior", "Posterior"}
    for name, dice in trained_result.dice_per_class.items():
        assert dice > 0.3, f"{name} Dice {dice:.3f} after the short budget"
    assert trained_result.mean_dice == pytest.approx(np.mean(list(trained_result.dice_per_class.values())))
    fold = trained_result.folds[0]
    assert fold.epochs == fold.epochs_trained == trained_result.epochs
    assert fold.train_seconds > 0 and fold.validation_seconds > 0

    # The model folder is stock nnU-Net: plans, dataset.json, stock trainer name in the checkpoint.
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json", "autonnunet.json"):
        assert (trained_model / name).is_file(), name
    assert trained_model.name == model_dir_name()
    checkpoint = _checkpoint(trained_model)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert checkpoint["current_epoch"] == trained_result.epochs
    record = json.loads((trained_model / "autonnunet.json").read_text())
    assert record["mean_dice"] == pytest.approx(trained_result.mean_dice)
    assert TrialConfig.from_dict(record["config"]) == TrialConfig()


def _stock_network(model_dir: Path):
    """The network stock nnU-Net builds from a model folder's plans.json alone."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans = json.loads((model_dir / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  1, 3, deep_supervision=False)


def test_plans_architecture_describes_the_trained_network(trained_model):
    # Stock nnU-Net rebuilds the network from plans.json alone: its weights must fit exactly.
    network = _stock_network(trained_model)
    network.load_state_dict(_checkpoint(trained_model)["network_weights"])  # raises on any mismatch


def test_resume_trains_only_the_missing_epochs_and_continues_the_schedule(hippo_workspace, tmp_path):
    low = tmp_path / "rung12" / model_dir_name()
    high = tmp_path / "rung37" / model_dir_name()
    straight = tmp_path / "straight37" / model_dir_name()
    budget = dict(folds=[0], max_epochs=37, iterations_per_epoch=1, device="cpu", seed=1, max_validation_cases=2)

    first = train(hippo_workspace, SMALL, low, epochs=12, **budget)
    resumed = train(hippo_workspace, SMALL, high, epochs=37, resume_from=low, **budget)
    direct = train(hippo_workspace, SMALL, straight, epochs=37, **budget)

    assert first.folds[0].epochs_trained == 12
    assert resumed.folds[0].epochs_trained == 25
    assert resumed.epochs == direct.epochs == 37
    # Cumulative training time carries over from the lower rung.
    assert resumed.train_seconds > first.train_seconds

    resumed_ckpt, direct_ckpt = _checkpoint(high), _checkpoint(straight)
    assert resumed_ckpt["current_epoch"] == direct_ckpt["current_epoch"] == 37
    resumed_lrs = resumed_ckpt["logging"]["lrs"]
    direct_lrs = direct_ckpt["logging"]["lrs"]
    assert len(resumed_lrs) == len(direct_lrs) == 37
    np.testing.assert_allclose(resumed_lrs, direct_lrs, rtol=1e-12)
    # The schedule runs against max_epochs (37), not against the rung's 12 epochs.
    expected = [PolyLR(None, 1e-2, 37).lr_at(e) for e in range(37)]
    np.testing.assert_allclose(direct_lrs, expected, rtol=1e-12)
    assert resumed_ckpt[CHECKPOINT_KEY]["max_epochs"] == 37


def test_resume_refuses_another_schedule_or_configuration(hippo_workspace, tmp_path):
    low = tmp_path / "low" / model_dir_name()
    train(hippo_workspace, SMALL, low, epochs=1, max_epochs=3, iterations_per_epoch=1, device="cpu",
          max_validation_cases=1)
    with pytest.raises(TrainingError, match="3-epoch schedule"):
        train(hippo_workspace, SMALL, tmp_path / "a", epochs=5, max_epochs=5, iterations_per_epoch=1,
              resume_from=low, device="cpu")
    with pytest.raises(TrainingError, match="another configuration"):
        train(hippo_workspace, SMALL.replace(initial_lr=0.05), tmp_path / "b", epochs=2, max_epochs=3,
              iterations_per_epoch=1, resume_from=low, device="cpu")
    with pytest.raises(TrainingError, match="does not exist"):
        train(hippo_workspace, SMALL, tmp_path / "c", epochs=2, max_epochs=3, iterations_per_epoch=1,
              resume_from=tmp_path / "nowhere", device="cpu")


@pytest.mark.parametrize(
    "config",
    [
        TrialConfig(optimizer="Adam", lr_scheduler="CosineAnnealing", loss="TopK10", initial_lr=1e-3,
                    base_num_features=8, max_features=64),
        TrialConfig(optimizer="AdamW", lr_scheduler="none", loss="CE", encoder_type="residual", model_scale=0,
                    activation="GELU", normalization="BatchNorm", dropout_rate=0.2, base_num_features=8,
                    max_features=64, aug_factor=2.0),
        TrialConfig(loss="Dice", activation="PReLU", n_stages=2, blocks_per_stage_encoder=[1, 1],
                    blocks_per_stage_decoder=[1], base_num_features=8, aug_factor=0.0),
    ],
    ids=["adam-cosine-topk", "adamw-residual-bn-gelu-dropout", "hnas-two-stages-dice"],
)
def test_searched_configurations_train_and_stay_stock_loadable(hippo_workspace, tmp_path, config):
    model_dir = tmp_path / model_dir_name()
    result = train(hippo_workspace, config, model_dir, epochs=1, max_epochs=10, iterations_per_epoch=2,
                   device="cpu", seed=0, max_validation_cases=1)
    assert math.isfinite(result.folds[0].final_loss)
    assert 0.0 <= result.mean_dice <= 1.0 or math.isnan(result.mean_dice)
    plans = json.loads((model_dir / "plans.json").read_text())
    network = _stock_network(model_dir)
    expected_class = "ResidualEncoderUNet" if config.encoder_type == "residual" else "PlainConvUNet"
    assert type(network).__name__ == expected_class
    network.load_state_dict(_checkpoint(model_dir)["network_weights"])
    # Our builder and stock nnU-Net's agree on the searched network.
    ours = build_network(json.loads((hippo_workspace.plans_file).read_text()), hippo_workspace.load_dataset_json(),
                         config, deep_supervision=False)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in network.parameters()]
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert kwargs["features_per_stage"][0] == config.base_num_features
    if config.n_stages is not None:
        assert kwargs["n_stages"] == config.n_stages


def test_augmentation_factor_scales_every_probability():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    def pipeline():
        return nnUNetTrainer.get_training_transforms(
            (40, 56, 40), ((-0.5, 0.5),) * 3, None, (0, 1, 2), False, foreground_labels=[1, 2])

    def probabilities(transform) -> list[float]:
        found, stack = [], [transform]
        while stack:
            node = stack.pop()
            for name, value in vars(node).items():
                if name == "apply_probability" or name.startswith("p_"):
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        found.append(float(value))
                elif isinstance(value, list):
                    stack.extend(v for v in value if hasattr(v, "__dict__"))
                elif hasattr(value, "__dict__") and type(value).__module__.startswith("batchgeneratorsv2"):
                    stack.append(value)
        return sorted(found)

    base = probabilities(pipeline())
    doubled = pipeline()
    assert scale_augmentation_probabilities(doubled, 2.0) >= 10
    assert probabilities(doubled) == sorted(min(1.0, 2 * p) for p in base)
    off = pipeline()
    scale_augmentation_probabilities(off, 0.0)
    assert all(p == 0.0 for p in probabilities(off))


def test_bad_budgets_and_configs_are_rejected(hippo_workspace, tmp_path):
    with pytest.raises(TrainingError, match="epochs must be in"):
        train(hippo_workspace, TrialConfig(), tmp_path, epochs=5, max_epochs=3)
    with pytest.raises(TrainingError, match="iterations_per_epoch"):
        train(hippo_workspace, TrialConfig(), tmp_path, epochs=1, iterations_per_epoch=0)
    with pytest.raises(ConfigError, match="optimizer"):
        TrialConfig(optimizer="RMSprop").validate()
    with pytest.raises(ConfigError, match="unknown TrialConfig fields: lr"):
        TrialConfig.from_dict({"lr": 0.1})
    assert parse_folds(["all"]) == [0, 1, 2, 3, 4]
    with pytest.raises(UserInputError):  # the one folds rule (AutoNNUNetLib.folds)
        parse_folds(["x"])


def test_train_command_writes_a_model_and_events(hippo_workspace, tmp_path, capsys):
    output = tmp_path / model_dir_name()
    events = tmp_path / "events.jsonl"
    code = cli_main(["train", "--workdir", str(hippo_workspace.root), "--epochs", "2", "--max-epochs", "4",
                     "--iterations-per-epoch", "1", "--config", json.dumps({"base_num_features": 8}),
                     "--output", str(output), "--events", str(events), "--device", "cpu",
                     "--max-validation-cases", "1"])
    assert code == 0
    assert (output / "fold_0" / "checkpoint_final.pth").is_file()
    kinds = [json.loads(line)["kind"] for line in events.read_text().splitlines()]
    assert kinds.count("epoch") == 2 and kinds[-1] == "finished"
    assert "validation Dice" in capsys.readouterr().out
    assert cli_main(["train", "--workdir", str(hippo_workspace.root), "--epochs", "1", "--config", "{bad"]) == 2


# -- issue 12 items 19 and 20 -------------------------------------------------------------------


def test_stock_export_to_zip_takes_our_model(trained_model, tmp_path):
    """Item 19: nnUNetv2_export_model_to_zip needs progress.png and validation/summary.json."""
    import os
    import subprocess
    import sys
    import zipfile

    from AutoNNUNetLib.model import install_for_nnunet

    results = tmp_path / "results"
    install_for_nnunet(trained_model, results)
    code = ("from nnunetv2.model_sharing.model_export import export_pretrained_model as export\n"
            f"export('Dataset004_Hippocampus', {str(tmp_path / 'stock.zip')!r}, configurations=('3d_fullres',), "
            "folds=(0,))")
    env = {**os.environ, "nnUNet_results": str(results), "nnUNet_raw": str(tmp_path), "nnUNet_preprocessed": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    names = zipfile.ZipFile(tmp_path / "stock.zip").namelist()
    prefix = f"Dataset004_Hippocampus/{model_dir_name()}"
    for member in ("fold_0/checkpoint_final.pth", "fold_0/progress.png", "fold_0/validation/summary.json", "plans.json"):
        assert f"{prefix}/{member}" in names
    summary = json.loads((trained_model / "fold_0" / "validation" / "summary.json").read_text())
    record = json.loads((trained_model / "autonnunet.json").read_text())
    assert summary["mean"]["1"]["Dice"] == pytest.approx(record["dice_per_class"]["Anterior"])
    assert summary["foreground_mean"]["Dice"] == pytest.approx(record["mean_dice"])


def test_validation_logits_are_float32_so_large_logits_do_not_crash(trained_model):
    """Item 20: nnU-Net sums tiles in float16 and raises "Encountered inf in predicted array"."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from AutoNNUNetLib.validation import sliding_window_logits

    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(trained_model), use_folds=(0,))
    network = predictor.network
    with torch.no_grad():  # logits far beyond float16's 65504, as a diverging configuration gives
        for head in network.decoder.seg_layers:
            head.weight.mul_(1e4)
            head.bias.mul_(1e4)
    patch = [int(p) for p in predictor.configuration_manager.patch_size]
    image = torch.from_numpy(np.random.default_rng(0).normal(size=(1, *patch)).astype(np.float32))
    with pytest.raises(RuntimeError, match="Encountered inf in predicted array"):
        predictor.predict_sliding_window_return_logits(image)
    logits = sliding_window_logits(predictor, image)
    assert logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())
    # The weighted tile sums (10x the logits at tile centres) are what overflowed float16.
    assert tuple(logits.shape) == (3, *patch) and 10 * float(logits.abs().max()) > 65504


def test_a_diverged_run_is_scored_dice_zero_with_its_reason(hippo_workspace, tmp_path, monkeypatch):
    """Item 20: a NaN loss is a result for the search (loss 1), not a crash."""
    import AutoNNUNetLib.trainer as trainer_module

    base = trainer_module.trainer_class()

    class Diverging(base):
        def train_step(self, batch):
            return {"loss": np.float32("nan")}

    monkeypatch.setattr(trainer_module, "trainer_class", lambda: Diverging)
    output = tmp_path / model_dir_name()
    result = train(hippo_workspace, SMALL, output, epochs=3, max_epochs=9, iterations_per_epoch=1, device="cpu")
    assert result.mean_dice == 0.0 and result.dice_per_class == {"Anterior": 0.0, "Posterior": 0.0}
    assert result.diverged == "training loss became nan at epoch 1 (fold 0)"
    assert result.epochs == 1  # no point training a diverged run on
    record = json.loads((output / "autonnunet.json").read_text())
    assert record["diverged"] == result.diverged and record["mean_dice"] == 0.0
    summary = json.loads((output / "fold_0" / "validation" / "summary.json").read_text())
    assert summary["diverged"] == result.diverged and summary["foreground_mean"]["Dice"] == 0.0


def test_train_command_reads_the_one_request_record(hippo_workspace, tmp_path, monkeypatch, capsys):
    """Issue 12 item 9 for the CLI: flags and ``--request FILE`` go through TrainParams."""
    from types import SimpleNamespace

    import AutoNNUNetLib.trainer as trainer_module

    calls = []

    def fake_train(workspace, config, output, **kwargs):
        calls.append((config, kwargs))
        return SimpleNamespace(dice_per_class={"Anterior": 0.5}, mean_dice=0.5, train_seconds=1.0, diverged=None,
                               model_dir=output)

    monkeypatch.setattr(trainer_module, "train", fake_train)
    base = ["train", "--workdir", str(hippo_workspace.root), "--output", str(tmp_path / "m")]
    assert cli_main([*base, "--epochs", "1", "--seed", str(2 ** 32)]) == 2
    assert "seed: must be between 0 and 4294967295" in capsys.readouterr().err
    assert cli_main([*base, "--epochs", str(10 ** 30)]) == 2
    assert cli_main(base) == 2 and "give --epochs" in capsys.readouterr().err
    assert calls == []  # refused before training
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"epochs": 4, "max_epochs": 8, "folds": [1, 2], "seed": 5, "device": "cpu",
                                   "config": {"optimizer": "Adam"}}))
    assert cli_main([*base, "--request", str(request), "--epochs", "3"]) == 0
    (config, kwargs), = calls
    assert config.optimizer == "Adam"
    assert (kwargs["epochs"], kwargs["max_epochs"], kwargs["folds"], kwargs["seed"], kwargs["device"],
            kwargs["iterations_per_epoch"]) == (3, 8, [1, 2], 5, "cpu", 250)
