"""Fingerprint, plans and preprocessing: the summary reports what nnU-Net wrote, in the stated axes."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AutoNNUNetLib.cli import main as cli_main
from AutoNNUNetLib.fingerprint import FingerprintError, FingerprintSummary, plan_and_preprocess, summarize
from AutoNNUNetLib.workspace import Workspace


def _label_histogram(raw_dataset: Path) -> np.ndarray:
    counts = np.zeros(3, dtype=np.int64)
    for path in sorted((raw_dataset / "labelsTr").glob("*.nii.gz")):
        counts += np.bincount(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.int64).ravel(), minlength=3)
    return counts


def test_summary_matches_the_hippocampus_files(hippo_workspace):
    summary = summarize(hippo_workspace)
    plans = json.loads(hippo_workspace.plans_file.read_text())
    fingerprint = json.loads((hippo_workspace.preprocessed_dataset / "dataset_fingerprint.json").read_text())
    fullres = plans["configurations"]["3d_fullres"]

    assert summary.dataset_name == "Dataset004_Hippocampus"
    assert summary.n_cases == 60
    assert summary.modality == ["MRI"]
    # MSD hippocampus volumes are 1 mm isotropic, about 35 x 50 x 35 voxels.
    assert summary.spacing == pytest.approx((1.0, 1.0, 1.0), abs=1e-3)
    assert summary.median_shape == tuple(int(round(v)) for v in np.median(fingerprint["shapes_after_crop"], 0)[::-1])
    assert 30 <= summary.median_shape[0] <= 40 and 45 <= summary.median_shape[1] <= 55

    # Voxel counts per class agree with an independent count over the label maps.
    assert list(summary.voxels_per_class) == ["background", "Anterior", "Posterior"]
    expected = _label_histogram(hippo_workspace.raw_dataset)
    assert [summary.voxels_per_class[name] for name in ("background", "Anterior", "Posterior")] == expected.tolist()
    assert all(count > 0 for count in summary.voxels_per_class.values())

    # Intensities are nnU-Net's foreground statistics.
    channel = summary.intensity[0]
    stats = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    assert (channel.mean, channel.std) == (pytest.approx(stats["mean"]), pytest.approx(stats["std"]))
    assert channel.percentile_00_5 == pytest.approx(stats["percentile_00_5"])
    assert channel.percentile_99_5 == pytest.approx(stats["percentile_99_5"])
    assert channel.percentile_00_5 < channel.mean < channel.percentile_99_5
    assert channel.normalization == "ZScoreNormalization"

    # The plan: identity transpose for isotropic data, so (x, y, z) is the plans' order reversed.
    assert plans["transpose_forward"] == [0, 1, 2]
    assert summary.configuration == "3d_fullres"
    assert summary.patch_size == tuple(fullres["patch_size"][::-1])
    assert summary.batch_size == fullres["batch_size"]
    assert summary.target_spacing == pytest.approx(tuple(fullres["spacing"][::-1]))
    arch = fullres["architecture"]["arch_kwargs"]
    assert summary.n_stages == arch["n_stages"] == len(summary.features_per_stage)
    assert summary.features_per_stage == tuple(arch["features_per_stage"])
    assert summary.features_per_stage[0] == 32
    assert summary.network_class.endswith("PlainConvUNet")
    assert "3d_fullres" in summary.configurations and "2d" in summary.configurations


def test_summary_text_and_json(hippo_workspace):
    summary = summarize(hippo_workspace)
    data = summary.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["patch_size"] == list(summary.patch_size)
    assert data["voxels_per_class"]["Anterior"] == summary.voxels_per_class["Anterior"]
    assert data["intensity"][0]["name"] == "MRI"
    assert data["axis_order"] == "xyz"

    text = summary.to_text()
    assert "patch size (x, y, z)" in text
    assert " x ".join(str(v) for v in summary.patch_size) in text
    assert f"{summary.voxels_per_class['Posterior']:,}" in text
    assert summary.network_class in text


def test_cli_prints_the_summary_as_json(hippo_workspace):
    out = io.StringIO()
    with redirect_stdout(out):
        status = cli_main(["fingerprint", "--workdir", str(hippo_workspace.root), "--summary-only", "--json"])
    assert status == 0
    assert json.loads(out.getvalue()) == summarize(hippo_workspace).to_dict()


def _small_raw_dataset(source: Workspace, root: Path, n_cases: int, two_d: bool = False) -> Workspace:
    """A few hippocampus cases from the session workspace; ``two_d`` keeps only the middle slice."""
    workspace = Workspace(root, dataset_name="Dataset010_Small")
    target = workspace.raw_dataset
    (target / "imagesTr").mkdir(parents=True)
    (target / "labelsTr").mkdir()
    labels = sorted((source.raw_dataset / "labelsTr").glob("*.nii.gz"))[:n_cases]
    for label in labels:
        case = label.name[: -len(".nii.gz")]
        pairs = ((source.raw_dataset / "imagesTr" / f"{case}_0000.nii.gz", target / "imagesTr" / f"{case}_0000.nii.gz"),
                 (label, target / "labelsTr" / label.name))
        for src, dst in pairs:
            if two_d:
                image = sitk.ReadImage(str(src))
                middle = image.GetSize()[2] // 2
                sitk.WriteImage(image[:, :, middle], str(dst))
            else:
                shutil.copy(src, dst)
    dataset_json = json.loads((source.raw_dataset / "dataset.json").read_text())
    dataset_json["numTraining"] = len(labels)
    (target / "dataset.json").write_text(json.dumps(dataset_json))
    return workspace


def test_plan_and_preprocess_with_in_process_augmentation_setting(hippo_workspace, tmp_path, monkeypatch):
    # nnUNet_n_proc_DA=0 is what CPU training sets; the 2.8.1 planner would crash on it.
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    workspace = _small_raw_dataset(hippo_workspace, tmp_path / "ws", n_cases=4)
    events = []
    summary = plan_and_preprocess(workspace, num_processes=1, progress=events.append)

    assert os.environ["nnUNet_n_proc_DA"] == "0"  # restored
    assert isinstance(summary, FingerprintSummary)
    assert summary.n_cases == 4 and summary.configuration == "3d_fullres"
    preprocessed = workspace.preprocessed_dataset
    assert workspace.plans_file.is_file()
    assert len(list((preprocessed / "nnUNetPlans_3d_fullres").glob("*.pkl"))) == 4
    assert len(list((preprocessed / "gt_segmentations").glob("*.nii.gz"))) == 4
    assert [e.kind for e in events].count("stage") >= 3
    assert events[-1].kind == "progress" and events[-1].data["fraction"] == 1.0
    messages = " ".join(e.data.get("message", "") for e in events)
    assert "fingerprint" in messages and "planning" in messages and "preprocessing 3d_fullres" in messages


def test_two_dimensional_data_gets_the_2d_configuration(hippo_workspace, tmp_path):
    workspace = _small_raw_dataset(hippo_workspace, tmp_path / "ws2d", n_cases=4, two_d=True)
    summary = plan_and_preprocess(workspace, num_processes=1)

    plans = json.loads(workspace.plans_file.read_text())
    assert "3d_fullres" not in plans["configurations"]
    assert summary.configuration == "2d"
    # nnU-Net reads a 2D image as one slice with a made-up spacing across; the summary drops it.
    assert summary.spacing == pytest.approx((1.0, 1.0))
    assert len(summary.median_shape) == 2
    two_d = plans["configurations"]["2d"]
    assert plans["transpose_forward"] == [0, 1, 2]
    assert summary.patch_size == tuple(two_d["patch_size"][::-1])
    assert summary.batch_size == two_d["batch_size"]
    assert (workspace.preprocessed_dataset / "nnUNetPlans_2d").is_dir()


def test_missing_steps_are_reported(tmp_path):
    workspace = Workspace(tmp_path, dataset_name="Dataset011_Nothing")
    with pytest.raises(FingerprintError, match="dataset_fingerprint.json is missing"):
        summarize(workspace)
    with pytest.raises(FingerprintError, match="dataset.json is missing"):
        plan_and_preprocess(workspace)


def test_a_broken_plans_or_fingerprint_file_is_named(hippo_workspace, tmp_path, capsys):
    """Issue 12 item 18: a truncated nnUNetPlans.json gave a JSON traceback without the file's name."""
    workspace = Workspace(tmp_path / "ws", dataset_name=hippo_workspace.dataset_name)
    shutil.copytree(hippo_workspace.preprocessed_dataset, workspace.preprocessed_dataset,
                    ignore=shutil.ignore_patterns("nnUNetPlans_*", "gt_segmentations"))
    assert summarize(workspace).n_cases == 60  # the copy is complete
    text = workspace.plans_file.read_text()
    workspace.plans_file.write_text(text[: len(text) // 2])  # cut short, as by a killed run
    with pytest.raises(FingerprintError, match=rf"^{re.escape(str(workspace.plans_file))} is not valid JSON"):
        summarize(workspace)
    argv = ["fingerprint", "--workdir", str(workspace.root), "--summary-only"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert str(workspace.plans_file) in err and "fingerprint` again" in err and "\n" not in err

    workspace.plans_file.write_text(json.dumps({"plans_name": "nnUNetPlans"}))
    with pytest.raises(FingerprintError, match="lacks 'configurations', 'transpose_backward'"):
        summarize(workspace)
    workspace.plans_file.write_text(text)
    (workspace.preprocessed_dataset / "dataset_fingerprint.json").write_text("[]")
    with pytest.raises(FingerprintError, match="dataset_fingerprint.json does not hold a JSON object"):
        summarize(workspace)


def test_renumbered_labels_survive_planning(hippo_workspace, tmp_path):
    """Issue 12 item 15: labels stored as 7/8 are planned as 1/2, and the mapping travels with the
    dataset.json nnU-Net copies (into the preprocessed folder, and from there into every model)."""
    from AutoNNUNetLib.dataset import build_dataset, source_from_pairs
    from AutoNNUNetLib.dataset.classes import read_original_labels

    raw = hippo_workspace.raw_dataset
    rows = []
    for label in sorted((raw / "labelsTr").glob("*.nii.gz"))[:5]:
        case = label.name[: -len(".nii.gz")]
        image = sitk.ReadImage(str(label))
        stored = sitk.GetArrayFromImage(image).astype(np.int16)
        stored[stored == 1], stored[stored == 2] = 7, 8
        original = sitk.GetImageFromArray(stored)
        original.CopyInformation(image)
        sitk.WriteImage(original, str(tmp_path / f"{case}_seg.nrrd"))
        rows.append((case, [raw / "imagesTr" / f"{case}_0000.nii.gz"], tmp_path / f"{case}_seg.nrrd"))
    workspace = Workspace(tmp_path / "ws")
    build_dataset(source_from_pairs(rows, classes={"background": 0, "anterior": 7, "posterior": 8}, channel_names=["MRI"]),
                  workspace, dataset_id=12, name="Renumbered")
    summary = plan_and_preprocess(workspace, num_processes=1)
    assert summary.n_cases == 5
    assert set(summary.voxels_per_class) == {"background", "anterior", "posterior"}
    assert min(summary.voxels_per_class.values()) > 0
    assert read_original_labels(workspace.preprocessed_dataset / "dataset.json") == {0: 0, 1: 7, 2: 8}
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(next((workspace.preprocessed_dataset / "gt_segmentations").iterdir()))))
    assert set(np.unique(seg)) == {0, 1, 2}
