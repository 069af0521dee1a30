"""predict and import-model with messy input (issue 12 items 12, 16, 17; issue 11 item 7).

Each case runs the real CLI in a subprocess and checks the user sees one line, no traceback,
and, for problems a file can show, sees it before the model is loaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from AutoNNUNetLib.dataset.records import ChannelFile
from AutoNNUNetLib.inference_inputs import PredictionError, case_channels, read_case
from AutoNNUNetLib.model import read_model_info

PREFIX = "Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres"


def run_cli(*argv: str, timeout: float = 300) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "AutoNNUNetLib", *argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def assert_one_line_error(code: int, output: str, *needles: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if ": error: " in line]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture()
def fake_model(tmp_path) -> Path:
    """A model folder whose checkpoint is garbage: any check that passes must come before loading."""
    model = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps({"dataset_name": "Dataset004_Hippocampus",
                                                  "configurations": {"3d_fullres": {}}}))
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1},
                                                    "file_ending": ".nii.gz"}))
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint" * 100)
    return model


@pytest.fixture()
def image(tmp_path) -> Path:
    path = tmp_path / "case_0000.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((8, 9, 10), dtype=np.float32)), str(path))
    return path


def test_a_missing_input_is_reported_before_the_model_loads(fake_model, tmp_path):
    code, output, seconds = run_cli("predict", "--model", str(fake_model), "-i", str(tmp_path / "nope.nii.gz"),
                                    "-o", str(tmp_path / "out.nii.gz"), "--device", "cpu")
    # The checkpoint is garbage: had the model been loaded first (13.6 s before the message, as it
    # was), the error would name the checkpoint. It names the input, so nothing was loaded.
    assert_one_line_error(code, output, "nope.nii.gz", "no such file")
    assert "checkpoint" not in output


def test_an_output_with_a_wrong_ending_is_refused_before_inference(fake_model, image, tmp_path):
    code, output, _ = run_cli("predict", "--model", str(fake_model), "-i", str(image), "-o", str(tmp_path / "out.txt"),
                              "--device", "cpu")
    assert_one_line_error(code, output, "out.txt", "unknown image format", ".nii.gz")
    code, output, _ = run_cli("predict", "--model", str(fake_model), "-i", str(image), "-o", str(tmp_path),
                              "--device", "cpu")
    assert_one_line_error(code, output, "is a folder")


def test_cuda_without_cuda_is_one_line(fake_model, image, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, output, _ = run_cli("predict", "--model", str(fake_model), "-i", str(image), "-o", str(tmp_path / "o.nii.gz"),
                              "--device", "cuda")
    assert_one_line_error(code, output, "CUDA is not available")


def test_nan_in_a_nifti_input_is_refused(fake_model, tmp_path):
    """SimpleITK reads NaN in NIfTI as 0; the check must see them (nibabel keeps them)."""
    data = np.ones((10, 9, 8), dtype=np.float32)
    data[2, 3, 4] = np.nan
    data[5, 5, 5] = np.inf
    path = tmp_path / "nan_0000.nii.gz"
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), str(path))
    code, output, _ = run_cli("predict", "--model", str(fake_model), "-i", str(path), "-o", str(tmp_path / "o.nii.gz"),
                              "--device", "cpu")
    assert_one_line_error(code, output, "nan_0000.nii.gz", "2 voxel(s) are NaN or infinite")


def test_a_4d_two_channel_file_is_split_into_the_models_channels(tmp_path):
    """Issue 12 item 17: ``dataset`` splits a 4D file, predict must accept it too."""
    channels = [np.full((6, 7, 8), value, dtype=np.float32) for value in (1.0, 2.0)]
    image = sitk.JoinSeries([sitk.GetImageFromArray(c) for c in channels])
    image.SetSpacing((0.5, 0.6, 0.7, 1.0))
    image.SetOrigin((1.0, 2.0, 3.0, 0.0))
    path = tmp_path / "brats_0000.nii.gz"
    sitk.WriteImage(image, str(path))
    specs = case_channels([path], 2)
    assert specs == [ChannelFile(path, 0), ChannelFile(path, 1)]
    volumes = read_case(specs)
    assert [float(v.array.mean()) for v in volumes] == [1.0, 2.0]
    assert volumes[0].array.shape == (6, 7, 8)
    assert volumes[1].geometry.spacing == pytest.approx((0.5, 0.6, 0.7))
    assert volumes[1].geometry.origin == pytest.approx((1.0, 2.0, 3.0))
    with pytest.raises(PredictionError, match="expects 3 channel"):
        case_channels([path], 3)


def test_truncated_checkpoint_is_one_line(trained_model, image, tmp_path):
    model = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    shutil.copytree(trained_model, model)
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    code, output, _ = run_cli("predict", "--model", str(model), "-i", str(image), "-o", str(tmp_path / "o.nii.gz"),
                              "--device", "cpu")
    assert_one_line_error(code, output, "checkpoint_final.pth", "truncated or corrupt")
    assert not (tmp_path / "o.nii.gz").exists()


def test_trust_checkpoint_on_garbage_is_one_line(fake_model, tmp_path):
    archive = tmp_path / "garbage.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(fake_model.rglob("*")):
            if path.is_file():
                handle.write(path, f"{PREFIX}/{path.relative_to(fake_model).as_posix()}")
    for extra in ([], ["--trust-checkpoint"]):
        code, output, _ = run_cli("import-model", str(archive), str(tmp_path / "models"), *extra)
        assert_one_line_error(code, output, "checkpoint_final.pth")
    assert not list((tmp_path / "models").glob("Dataset*"))


def test_model_metadata_is_read_without_torch(fake_model):
    """Issue 11 item 7: a remote-only user (no torch) reads a collected model from its JSON files."""
    code = ("import sys, json\nsys.modules['torch'] = None  # any torch import now fails\n"
            "from AutoNNUNetLib.model import read_model_info\n"
            f"info = read_model_info({str(fake_model)!r})\n"
            "print(json.dumps([info.dataset_name, info.configuration, info.trainer_name, info.folds, "
            "info.channel_names, info.labels, info.checkpoints_checked]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["Dataset004_Hippocampus", "3d_fullres", "nnUNetTrainer", [0], ["MRI"],
                                       {"background": 0, "a": 1}, False]
    assert read_model_info(fake_model).file_ending == ".nii.gz"


def test_a_server_checked_model_imports_without_torch(fake_model, tmp_path):
    """Issue 11 item 7: collecting a remote model (checked on the server) needs no torch."""
    archive = tmp_path / "remote.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(fake_model.rglob("*")):
            if path.is_file():
                handle.write(path, f"{PREFIX}/{path.relative_to(fake_model).as_posix()}")
    code = ("import sys\nsys.modules['torch'] = None  # any torch import now fails\n"
            "from AutoNNUNetLib.cli import main\n"
            f"sys.exit(main(['import-model', {str(archive)!r}, {str(tmp_path / 'models')!r}, '--skip-checkpoint-check']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    model = tmp_path / "models" / PREFIX
    assert done.stdout.strip() == str(model)
    assert read_model_info(model).channel_names == ["MRI"]
    # Without the flag the checkpoint is opened, and this one is garbage.
    code, output, _ = run_cli("import-model", str(archive), str(tmp_path / "checked"))
    assert_one_line_error(code, output, "checkpoint_final.pth")
