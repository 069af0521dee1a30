"""Issue 12 item 1: a source's dataset.json, listing or links cannot reach files outside its folder.

Each attack uses a real "secret" NIfTI file beside the source folder. Before the fix the dataset
came out built, holding a voxel-identical copy of the secret; now intake refuses, writes nothing,
and its message is the same whether the outside target exists or not (it reveals nothing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AutoNNUNetLib.dataset import containment
from AutoNNUNetLib.dataset.build import build_dataset
from AutoNNUNetLib.dataset.records import DatasetError
from AutoNNUNetLib.dataset.sources import detect_source, read_pairs_csv, source_from_pairs

SHAPE = (4, 5, 6)
N_CASES = 5


def write(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 1.9))
    sitk.WriteImage(image, str(path))
    return path


def label(k: int) -> np.ndarray:
    array = np.zeros(SHAPE, np.uint8)
    array[1:3, 1 + k % 2 :, :] = 1
    return array


def image(k: int) -> np.ndarray:
    return np.random.default_rng(k).normal(50, 10, SHAPE).astype(np.float32)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside every source folder, with the same grid as the cases (the easiest theft)."""
    return write(np.full(SHAPE, 1234.5, np.float32), tmp_path / "private" / "secret.nii.gz")


def msd_folder(root: Path, images: list[str] | None = None) -> Path:
    folder = root / "Task01_Upload"
    entries = []
    for k in range(N_CASES):
        write(image(k), folder / "imagesTr" / f"c{k}.nii.gz")
        write(label(k), folder / "labelsTr" / f"c{k}.nii.gz")
        entries.append({"image": f"./imagesTr/c{k}.nii.gz", "label": f"./labelsTr/c{k}.nii.gz"})
    for k, path in enumerate(images or []):
        entries[k]["image"] = path
    meta = {"name": "Upload", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "thing"},
            "training": entries}
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def nnunet_folder(root: Path) -> Path:
    folder = root / "Dataset002_Upload"
    for k in range(N_CASES):
        write(image(k), folder / "imagesTr" / f"c{k}_0000.nii.gz")
        write(label(k), folder / "labelsTr" / f"c{k}.nii.gz")
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "thing": 1}, "numTraining": N_CASES,
            "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def refused(source_folder: Path, workdir: Path) -> str:
    """The one-line message of the refusal; asserts nothing was written."""
    with pytest.raises(DatasetError) as info:
        build_dataset(detect_source(source_folder, root=source_folder), workdir, name="Upload")
    assert not (workdir / "nnUNet_raw" / "Dataset001_Upload").exists()
    message = str(info.value)
    assert containment.OUTSIDE in message and "\n" not in message
    return message


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_dataset_json_paths_outside_the_folder_are_refused_without_a_trace(how, secret, tmp_path) -> None:
    uploads = tmp_path / "uploads"
    folder = msd_folder(uploads)
    target = str(secret) if how == "absolute" else os.path.relpath(secret, folder)
    message = refused(msd_folder(uploads, images=[target]), tmp_path / "ws")
    assert "entry 0 image" in message
    # The same words for a target that does not exist: no existence, type, voxel or geometry leak.
    missing = str(secret.with_name("nothing.nii.gz")) if how == "absolute" else "../../nothing.nii.gz"
    assert refused(msd_folder(uploads, images=[missing]), tmp_path / "ws") == message
    for leak in ("secret", "private", "1234", "0.7", "float", "not found", str(tmp_path)):
        assert leak not in message


def test_links_to_outside_files_are_refused(secret, tmp_path) -> None:
    folder = msd_folder(tmp_path / "a")
    (folder / "imagesTr" / "c0.nii.gz").unlink()
    (folder / "imagesTr" / "c0.nii.gz").symlink_to(secret)
    assert "entry 0 image" in refused(folder, tmp_path / "ws")

    raw = nnunet_folder(tmp_path / "b")
    (raw / "labelsTr" / "c3.nii.gz").unlink()
    (raw / "labelsTr" / "c3.nii.gz").symlink_to(secret)
    assert "case c3 label" in refused(raw, tmp_path / "ws")

    # The whole imagesTr folder a link to the outside.
    raw = nnunet_folder(tmp_path / "c")
    outside = tmp_path / "elsewhere"
    (raw / "imagesTr").rename(outside)
    (raw / "imagesTr").symlink_to(outside, target_is_directory=True)
    assert "channel 0" in refused(raw, tmp_path / "ws")


def test_dataset_json_that_is_a_link_is_refused(tmp_path) -> None:
    folder = msd_folder(tmp_path / "a")
    real = tmp_path / "outside.json"
    real.write_text((folder / "dataset.json").read_text())
    (folder / "dataset.json").unlink()
    (folder / "dataset.json").symlink_to(real)
    assert refused(folder, tmp_path / "ws") == f"dataset.json: {containment.OUTSIDE}"


def test_links_inside_the_folder_are_fine(tmp_path) -> None:
    folder = msd_folder(tmp_path / "a")
    (folder / "imagesTr" / "c0.nii.gz").rename(folder / "c0_real.nii.gz")
    (folder / "imagesTr" / "c0.nii.gz").symlink_to(folder / "c0_real.nii.gz")
    built = build_dataset(detect_source(folder, root=folder), tmp_path / "ws", name="Upload")
    assert len(list((built / "imagesTr").iterdir())) == N_CASES


def test_upload_check_covers_csv_pairs_and_changes_after_reading(secret, tmp_path) -> None:
    upload = tmp_path / "upload"
    rows = []
    for k in range(N_CASES):
        rows.append(f"c{k},{write(label(k), upload / f'l{k}.nii.gz').name},{write(image(k), upload / f'i{k}.nii.gz').name}")
    rows[2] = f"c2,l2.nii.gz,{secret}"  # an absolute path is fine for a local CSV, not in an upload
    (upload / "pairs.csv").write_text("case_id,label,image\n" + "\n".join(rows) + "\n")
    assert len(source_from_pairs(read_pairs_csv(upload / "pairs.csv")).cases) == N_CASES
    with pytest.raises(DatasetError, match=f"^case c2: a file of this case {containment.OUTSIDE}$"):
        detect_source(upload / "pairs.csv", root=upload)
    with pytest.raises(DatasetError, match="the source points outside"):
        detect_source(upload / "pairs.csv", root=tmp_path / "other")

    # Read while clean, then a file is swapped for a link before building: validation re-checks.
    folder = msd_folder(tmp_path / "b")
    source = detect_source(folder, root=folder)
    (folder / "labelsTr" / "c4.nii.gz").unlink()
    (folder / "labelsTr" / "c4.nii.gz").symlink_to(secret)
    with pytest.raises(DatasetError, match=f"case c4: a file of this case {containment.OUTSIDE}"):
        build_dataset(source, tmp_path / "ws", name="Upload")
    with pytest.raises(DatasetError, match="case c4"):
        containment.check_inside(source, folder)
    assert not (tmp_path / "ws" / "nnUNet_raw" / "Dataset001_Upload").exists()


@pytest.mark.parametrize("entry, phrase", [
    ("x" * 5000, "File name too long"),                # inside, but no file system can hold it
    ("a\x00b", containment.OUTSIDE),
    (123, "expected a relative file path"),
    ("", "expected a relative file path"),
    ("imagesTr", "is a folder, not an image file"),
])
def test_odd_entries_are_one_line_errors(entry, phrase, tmp_path) -> None:
    folder = msd_folder(tmp_path / "up")
    meta = json.loads((folder / "dataset.json").read_text())
    meta["training"][0]["image"] = entry
    (folder / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError) as info:
        build_dataset(detect_source(folder, root=folder), tmp_path / "ws", name="Upload")
    assert phrase in str(info.value) and "\n" not in str(info.value)


def test_odd_dataset_json_fields_are_one_line_errors(tmp_path) -> None:
    raw = nnunet_folder(tmp_path)
    meta = json.loads((raw / "dataset.json").read_text())
    meta["file_ending"] = "/../../x"  # would turn the listing's glob into a walk outside
    (raw / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"file_ending must look like '\.nii\.gz', got '/\.\./\.\./x'"):
        detect_source(raw, root=raw)
    folder = msd_folder(tmp_path / "msd")
    meta = json.loads((folder / "dataset.json").read_text())
    meta["modality"] = "MRI"
    (folder / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="modality must map channel numbers to names, got 'MRI'"):
        detect_source(folder)


def test_dataset_json_with_a_bom_is_read_and_a_huge_one_refused(tmp_path) -> None:
    folder = msd_folder(tmp_path / "a")
    text = (folder / "dataset.json").read_text()
    (folder / "dataset.json").write_text(text, encoding="utf-8-sig")  # Notepad's "UTF-8 with BOM"
    assert len(detect_source(folder, root=folder).cases) == N_CASES
    with open(folder / "dataset.json", "ab") as handle:
        handle.truncate(65 << 20)  # sparse: no real disk used
    with pytest.raises(DatasetError, match=r"dataset.json is 65 MB; a dataset.json is far smaller"):
        detect_source(folder, root=folder)
