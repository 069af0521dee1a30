"""A 2d configuration through the same paths as 3d_fullres, on generated anisotropic data.

Six small two-channel cases with 6.5 mm slices and 0.8 mm in-plane spacing on an oblique grid
(the demo's generator), written with SimpleITK as a real nnU-Net raw dataset, planned (2d and
3d_fullres) and preprocessed by nnU-Net; a 2d TrialConfig trained for a few iterations; one new
case predicted by our Predictor (in memory and through ``autonnunet predict`` on files).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from AutoNNUNetLib.config import TrialConfig
from AutoNNUNetLib.workspace import Workspace

SHAPE = (12, 48, 48)  # z, y, x
SPACING = (0.8, 0.8, 6.5)  # x, y, z in mm
CASES = 6


@pytest.fixture(scope="module")
def anisotropic(tmp_path_factory):
    """The planned and preprocessed workspace and a 2d model trained on it (1 epoch x 3 iterations)."""
    from AutoNNUNetLib.dataset import build_dataset
    from AutoNNUNetLib.demo import generate_source
    from AutoNNUNetLib.fingerprint import plan_and_preprocess
    from AutoNNUNetLib.trainer import model_dir_name, train

    workspace = Workspace(tmp_path_factory.mktemp("anisotropic"))
    build_dataset(generate_source(CASES, shape=SHAPE, spacing=SPACING), workspace, dataset_id=9, name="Aniso")
    plan_and_preprocess(workspace, configurations=("2d", "3d_fullres"), num_processes=1)
    config = TrialConfig(configuration="2d")
    model_dir = workspace.results / workspace.require_dataset() / model_dir_name(config.configuration)
    result = train(workspace, config, model_dir, folds=[0], epochs=1, iterations_per_epoch=3, device="cpu",
                   seed=0, max_validation_cases=1)
    return workspace, model_dir, result


def test_nnunet_plans_2d_in_plane_and_3d_with_thick_slices(anisotropic):
    workspace, _, _ = anisotropic
    plans = workspace.load_plans()
    assert {"2d", "3d_fullres"} <= set(plans["configurations"])
    spacing_3d = plans["configurations"]["3d_fullres"]["spacing"]
    assert max(spacing_3d) == pytest.approx(6.5) and min(spacing_3d) == pytest.approx(0.8)
    assert plans["configurations"]["2d"]["spacing"] == pytest.approx([0.8, 0.8])  # slices at full in-plane detail
    for name in ("2d", "3d_fullres"):
        assert (workspace.preprocessed_dataset / plans["configurations"][name]["data_identifier"]).is_dir()


def test_the_2d_model_is_a_stock_2d_nnunet_model(anisotropic):
    import torch

    _, model_dir, result = anisotropic
    assert model_dir.name == "nnUNetTrainer__nnUNetPlans__2d"
    assert set(result.dice_per_class) == {"rim", "core"}
    record = json.loads((model_dir / "autonnunet.json").read_text())
    assert record["configuration"] == "2d" and record["config"]["configuration"] == "2d"
    kwargs = json.loads((model_dir / "plans.json").read_text())["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert kwargs["conv_op"].endswith("Conv2d") and all(len(k) == 2 for k in kwargs["kernel_sizes"])
    checkpoint = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["init_args"]["configuration"] == "2d" and checkpoint["trainer_name"] == "nnUNetTrainer"


def test_predictor_keeps_the_input_grid_in_memory_and_through_files(anisotropic, tmp_path):
    import SimpleITK as sitk

    from AutoNNUNetLib import cli
    from AutoNNUNetLib.demo import DEMO_CLASSES, generate_case
    from AutoNNUNetLib.inference import Predictor

    _, model_dir, _ = anisotropic
    channels, truth = generate_case(seed=10_000, shape=SHAPE, spacing=SPACING)
    prediction = Predictor(model_dir, device="cpu").predict(channels)
    assert prediction.array.shape == SHAPE == truth.array.shape
    assert prediction.geometry == channels[0].geometry
    assert prediction.geometry.spacing == pytest.approx(SPACING)
    assert set(np.unique(prediction.array)) <= set(DEMO_CLASSES.values())

    # the same case as SimpleITK files, through `autonnunet predict`
    inputs = tmp_path / "in"
    inputs.mkdir()
    for index, volume in enumerate(channels):
        volume.write(inputs / f"case_{index:04d}.nii.gz")
    output = tmp_path / "case.nii.gz"
    assert cli.main(["predict", "--model", str(model_dir), "-i", *sorted(map(str, inputs.iterdir())), "-o",
                     str(output), "--device", "cpu"]) == 0
    written, image = sitk.ReadImage(str(output)), sitk.ReadImage(str(inputs / "case_0000.nii.gz"))
    assert written.GetSize() == image.GetSize() == (SHAPE[2], SHAPE[1], SHAPE[0])
    assert written.GetSpacing() == pytest.approx(image.GetSpacing())
    assert written.GetOrigin() == pytest.approx(image.GetOrigin())
    assert written.GetDirection() == pytest.approx(image.GetDirection())
    labels = sitk.GetArrayFromImage(written)
    assert set(np.unique(labels)) <= set(DEMO_CLASSES.values())
    assert np.array_equal(labels, prediction.array)  # the file path gives the in-memory result
