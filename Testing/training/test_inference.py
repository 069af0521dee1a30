"""Inference: our in-memory predictor gives nnUNetv2_predict's label maps, on the input's grid."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from AutoNNUNetLib.cli import main as cli_main
from AutoNNUNetLib.dataset import Geometry, Volume
from AutoNNUNetLib.inference import PredictionError, Predictor, find_cases
from AutoNNUNetLib.model import export_model, import_model, install_for_nnunet

DATASET = "Dataset004_Hippocampus"
N_CASES = 3


@pytest.fixture(scope="module")
def imported_model(trained_model, tmp_path_factory) -> Path:
    """The session model after an export/import round trip: what a user receives."""
    folder = tmp_path_factory.mktemp("inference_model")
    return import_model(export_model(trained_model, folder / "model.zip"), folder / "models")


@pytest.fixture(scope="module")
def predictor(imported_model) -> Predictor:
    return Predictor(imported_model, device="cpu")


def _odd_geometry(volume: Volume) -> Volume:
    """The same voxels on an unusual grid: anisotropic spacing, shifted origin, rotated and flipped axes."""
    angle = math.radians(30.0)
    c, s = math.cos(angle), math.sin(angle)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, -1.0)
    return Volume(volume.array, Geometry((0.9, 1.2, 1.5), (-12.5, 30.25, 7.0), direction))


@pytest.fixture(scope="module")
def input_folder(hippo_workspace, tmp_path_factory) -> Path:
    """A few hippocampus images in nnU-Net naming, plus one of them on an odd grid."""
    folder = tmp_path_factory.mktemp("inference_inputs")
    images = sorted((hippo_workspace.raw_dataset / "imagesTr").glob("*_0000.nii.gz"))[:N_CASES]
    for path in images:
        Volume.read(path).write(folder / path.name)
    _odd_geometry(Volume.read(images[0])).write(folder / "odd_0000.nii.gz")
    return folder


def _nnunetv2_predict(model: Path, inputs: Path, output: Path, results: Path, mirroring: bool) -> None:
    install_for_nnunet(model, results)
    command = [
        str(Path(sys.executable).with_name("nnUNetv2_predict")),
        "-i", str(inputs), "-o", str(output), "-d", DATASET, "-c", "3d_fullres", "-f", "0",
        "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar",
    ]
    if not mirroring:
        command.append("--disable_tta")
    environment = dict(os.environ, nnUNet_results=str(results))
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_same_label_maps_as_nnunetv2_predict(imported_model, predictor, input_folder, tmp_path):
    _nnunetv2_predict(imported_model, input_folder, tmp_path / "stock", tmp_path / "results", mirroring=False)

    cases = find_cases(input_folder, ".nii.gz", 1)
    assert len(cases) == N_CASES + 1
    foreground = 0
    for case_id, (image_path,) in cases.items():
        image = Volume.read(image_path)
        ours = predictor.predict([image])
        stock = Volume.read(tmp_path / "stock" / f"{case_id}.nii.gz")
        assert ours.array.shape == image.array.shape
        assert np.array_equal(ours.array, stock.array), f"{case_id}: {np.sum(ours.array != stock.array)} voxels differ"
        assert stock.geometry.close_to(ours.geometry, 1e-5)
        foreground += int(np.count_nonzero(ours.array))
        assert set(np.unique(ours.array)) <= {0, 1, 2}
    # The model segments something, so equality is not two empty maps agreeing.
    assert foreground > 1000


def test_same_label_maps_as_nnunetv2_predict_with_mirroring(imported_model, input_folder, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    source = sorted(input_folder.glob("*_0000.nii.gz"))[1]
    (single / source.name).write_bytes(source.read_bytes())
    _nnunetv2_predict(imported_model, single, tmp_path / "stock", tmp_path / "results", mirroring=True)

    mirrored = Predictor(imported_model, device="cpu", use_mirroring=True)
    ours = mirrored.predict([Volume.read(source)])
    stock = Volume.read(tmp_path / "stock" / source.name.replace("_0000", ""))
    assert np.array_equal(ours.array, stock.array)
    assert np.count_nonzero(ours.array) > 0


def test_output_keeps_the_input_grid(predictor, input_folder, tmp_path):
    original = Volume.read(sorted(input_folder.glob("hippocampus*_0000.nii.gz"))[0])
    odd = _odd_geometry(original)
    result = predictor.predict([odd])
    assert result.array.shape == odd.array.shape
    assert result.geometry == odd.geometry
    assert result.array.dtype == np.uint8

    # Through a file: spacing, origin and direction survive writing and reading.
    written = predictor.predict_file([input_folder / "odd_0000.nii.gz"], tmp_path / "out" / "odd.nii.gz")
    image = sitk.ReadImage(str(written))
    assert image.GetSize() == tuple(reversed(odd.array.shape))
    assert image.GetSpacing() == pytest.approx(odd.geometry.spacing, abs=1e-5)
    assert image.GetOrigin() == pytest.approx(odd.geometry.origin, abs=1e-5)
    assert image.GetDirection() == pytest.approx(odd.geometry.direction, abs=1e-5)
    # (The file stores spacing as float32, so compare with the prediction of what was read back.)
    reread = predictor.predict([Volume.read(input_folder / "odd_0000.nii.gz")])
    assert np.array_equal(sitk.GetArrayFromImage(image), reread.array)

    # nnU-Net ignores origin and direction: only the spacing changes what the network sees.
    moved = Volume(original.array, Geometry(original.geometry.spacing, odd.geometry.origin, odd.geometry.direction))
    assert np.array_equal(predictor.predict([moved]).array, predictor.predict([original]).array)


def test_largest_component_per_class(predictor, input_folder):
    image = Volume.read(sorted(input_folder.glob("hippocampus*_0000.nii.gz"))[0])
    plain = predictor.predict([image]).array
    predictor.largest_component = True
    try:
        cleaned = predictor.predict([image]).array
    finally:
        predictor.largest_component = False
    for label in (1, 2):
        if np.any(plain == label):
            # nnU-Net's operation counts voxels touching at a corner as connected (full connectivity).
            _, count = ndimage.label(cleaned == label, structure=np.ones((3, 3, 3), bool))
            assert count == 1, f"class {label} has {count} components"
    # Only removals, to background.
    kept = cleaned != 0
    assert np.array_equal(cleaned[kept], plain[kept])
    assert np.count_nonzero(cleaned) <= np.count_nonzero(plain)


def test_bad_inputs_are_explained(predictor, imported_model, input_folder, tmp_path):
    image = Volume.read(sorted(input_folder.glob("hippocampus*_0000.nii.gz"))[0])
    with pytest.raises(PredictionError, match=r"expects 1 channel\(s\) \(MRI\), got 2"):
        predictor.predict([image, image])
    broken = Volume(image.array.astype(np.float32), image.geometry)
    broken.array[0, 0, 0] = np.nan
    with pytest.raises(PredictionError, match="NaN"):
        predictor.predict([broken])
    with pytest.raises(PredictionError, match="3D model"):
        predictor.predict([Volume(image.array[0], Geometry.identity(2))])
    with pytest.raises(PredictionError, match=r"fold\(s\) \[3\] have no checkpoint_final.pth"):
        Predictor(imported_model, folds=[3], device="cpu")
    with pytest.raises(PredictionError, match="is not a model folder"):
        Predictor(tmp_path, device="cpu")
    with pytest.raises(PredictionError, match="no images named <case>_0000.nii.gz"):
        find_cases(tmp_path, ".nii.gz", 1)
    (tmp_path / "brain_0001.nii.gz").write_bytes(b"")
    with pytest.raises(PredictionError, match="case brain lacks brain_0000.nii.gz"):
        find_cases(tmp_path, ".nii.gz", 2)


def test_predict_folder_and_cli(predictor, imported_model, input_folder, tmp_path):
    events = []
    written = predictor.predict_folder(input_folder, tmp_path / "folder", progress=events.append)
    assert [p.name for p in written] == sorted(f"{case}.nii.gz" for case in find_cases(input_folder, ".nii.gz", 1))
    assert events[-1].data["fraction"] == 1.0

    out = io.StringIO()
    with redirect_stdout(out):
        status = cli_main(["predict", "--model", str(imported_model), "-i", str(input_folder / "odd_0000.nii.gz"),
                           "-o", str(tmp_path / "cli" / "odd.nii.gz"), "--device", "cpu", "--folds", "0"])
    assert status == 0 and out.getvalue().strip() == str(tmp_path / "cli" / "odd.nii.gz")
    assert np.array_equal(Volume.read(tmp_path / "cli" / "odd.nii.gz").array,
                          Volume.read(tmp_path / "folder" / "odd.nii.gz").array)


def test_original_label_values_are_written_back(predictor, imported_model, input_folder, tmp_path):
    """Intake renumbers files' values (7, 9 -> 1, 2) and records them in dataset.json, which nnU-Net
    copies into the model; --original-labels writes predictions in the files' values again."""
    import json
    import shutil

    from AutoNNUNetLib.dataset.classes import ORIGINAL_LABELS_KEY

    model = tmp_path / "model"
    shutil.copytree(imported_model, model)
    dataset_json = json.loads((model / "dataset.json").read_text())
    dataset_json[ORIGINAL_LABELS_KEY] = {"0": 0, "1": 7, "2": 9}
    (model / "dataset.json").write_text(json.dumps(dataset_json))
    image = input_folder / "odd_0000.nii.gz"
    plain = predictor.predict([Volume.read(image)]).array
    assert set(np.unique(plain)) <= {0, 1, 2} and np.any(plain > 0)

    status = cli_main(["predict", "--model", str(model), "-i", str(image), "-o", str(tmp_path / "orig.nii.gz"),
                       "--device", "cpu", "--original-labels"])
    restored = Volume.read(tmp_path / "orig.nii.gz").array
    assert status == 0
    assert np.array_equal(restored, np.array([0, 7, 9])[plain])
    # Without the flag the model's own values are written.
    assert np.array_equal(Predictor(model, device="cpu").predict([Volume.read(image)]).array, plain)
