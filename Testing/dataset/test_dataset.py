"""Tests of the AutoNNUNetLib.dataset package: assembly from every source kind, validation, atomic writing, CLI.

The real hippocampus cases are used by path (a 4-case copy for detailed checks, all 60 once);
everything else is small synthetic data built here, so the file runs in seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

from AutoNNUNetLib import cli
from AutoNNUNetLib import dataset as ds
from AutoNNUNetLib.dataset import build as ds_build
from AutoNNUNetLib.dataset import (
    Case,
    ChannelFile,
    DatasetError,
    DatasetSource,
    Geometry,
    Volume,
    build_dataset,
    detect_source,
    source_from_msd,
    source_from_nnunet_raw,
    source_from_pairs,
)
from AutoNNUNetLib.events import ProgressEvent
from AutoNNUNetLib.workspace import Workspace

HIPPOCAMPUS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "Task04_Hippocampus"
FLOAT_LABEL_CASE = "hippocampus_243"  # its label file is stored as float32 (a quirk kept on purpose)

# An oblique, non-trivial grid: catches any code that drops or transposes the direction matrix.
_ANGLE = np.deg2rad(20)
OBLIQUE = Geometry(
    spacing=(0.8, 1.2, 2.5),
    origin=(-12.5, 40.25, 7.0),
    direction=(np.cos(_ANGLE), -np.sin(_ANGLE), 0.0, np.sin(_ANGLE), np.cos(_ANGLE), 0.0, 0.0, 0.0, 1.0),
)
SHAPE = (6, 10, 8)  # z, y, x
CLASSES = {"background": 0, "liver": 1, "spleen": 2}


# --------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def hippo() -> Path:
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"hippocampus data not found at {HIPPOCAMPUS}")
    return HIPPOCAMPUS


def _pixel_type(path: Path) -> int:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetPixelID()


@pytest.fixture
def hippo_subset(hippo: Path, tmp_path: Path) -> Path:
    """An MSD folder with 5 hippocampus cases: the float32 label, a uint8 image and float32 images."""
    meta = json.loads((hippo / "dataset.json").read_text())
    ids = [Path(e["label"]).name[: -len(".nii.gz")] for e in meta["training"]]
    uint8_ids = [i for i in ids if _pixel_type(hippo / "imagesTr" / f"{i}.nii.gz") == sitk.sitkUInt8]
    float_ids = [i for i in ids if i not in uint8_ids and i != FLOAT_LABEL_CASE]
    chosen = [FLOAT_LABEL_CASE, uint8_ids[0], *float_ids[:3]]
    folder = tmp_path / "Task04_subset"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
        for case_id in chosen:
            shutil.copyfile(hippo / sub / f"{case_id}.nii.gz", folder / sub / f"{case_id}.nii.gz")
    meta["training"] = [e for e in meta["training"] if Path(e["label"]).name[: -len(".nii.gz")] in chosen]
    meta["numTraining"] = len(chosen)
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def write_image(array: np.ndarray, path: Path, geometry: Geometry = OBLIQUE) -> None:
    sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(array)), str(path))


def read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def assert_same_grid(a: sitk.Image, b: sitk.Image, exact: bool = True) -> None:
    assert a.GetSize() == b.GetSize()
    if exact:
        assert a.GetSpacing() == b.GetSpacing()
        assert a.GetOrigin() == b.GetOrigin()
        assert a.GetDirection() == b.GetDirection()
    else:  # NIfTI stores geometry as float32
        np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-5)


def assert_same_geometry(image: sitk.Image, geometry: Geometry) -> None:
    np.testing.assert_allclose(image.GetSpacing(), geometry.spacing, rtol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), geometry.origin, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), geometry.direction, atol=1e-5)


def label_array(seed: int, values: Sequence[int] = (1, 2)) -> np.ndarray:
    """A label map holding every value in ``values`` (plus background) in distinct blocks."""
    rng = np.random.default_rng(seed)
    array = np.zeros(SHAPE, dtype=np.uint8)
    for k, value in enumerate(values):
        array[1 + k % 4, 1 + k // 4 :, :] = value
    array[0, 0, : rng.integers(1, 4)] = values[0]
    return array


def image_array(seed: int, dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(seed).normal(100, 20, SHAPE)).astype(dtype)


def volume_case(
    case_id: str,
    seed: int = 0,
    n_channels: int = 1,
    geometry: Geometry = OBLIQUE,
    label: Optional[np.ndarray] = None,
    label_geometry: Optional[Geometry] = None,
    label_names: Optional[dict[int, str]] = None,
) -> Case:
    channels = [Volume(image_array(seed * 10 + c), geometry) for c in range(n_channels)]
    label = label_array(seed) if label is None else label
    return Case(case_id, channels, Volume(label, label_geometry or geometry), label_names)


def volume_source(cases: Sequence[Case], n_channels: int = 1, classes=CLASSES) -> DatasetSource:
    names = ["T1", "T2", "FLAIR"][:n_channels]
    return DatasetSource(list(cases), dict(classes) if classes is not None else None, names)


def assert_nothing_written(workspace_root: Path, name: str = "Test", dataset_id: int = 1) -> None:
    """No target folder and no hidden temporary/backup folders left in nnUNet_raw."""
    raw = workspace_root / "nnUNet_raw"
    assert not (raw / f"Dataset{dataset_id:03d}_{name}").exists()
    if raw.exists():
        assert [p.name for p in raw.iterdir() if p.name.startswith(".")] == []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Sources


def test_msd_subset_geometry_values_and_dtypes(hippo_subset: Path, tmp_path: Path) -> None:
    source = source_from_msd(hippo_subset)
    assert source.classes == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert source.channel_names == ["MRI"]
    assert source.name == "Hippocampus"
    workspace = Workspace(tmp_path / "ws")
    folder = build_dataset(source, workspace, dataset_id=4, name=source.name)

    assert folder == workspace.raw / "Dataset004_Hippocampus"
    assert workspace.dataset_name == "Dataset004_Hippocampus"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert meta["numTraining"] == 5
    assert meta["file_ending"] == ".nii.gz"

    image_types = set()
    for case in source.cases:
        src_image, src_label = read(case.channels[0]), read(case.label)
        out_image = read(folder / "imagesTr" / f"{case.case_id}_0000.nii.gz")
        out_label = read(folder / "labelsTr" / f"{case.case_id}.nii.gz")
        assert_same_grid(out_image, src_image)
        assert_same_grid(out_label, src_image)
        # Images keep voxel values and voxel type; labels become uint8 with the same values.
        assert out_image.GetPixelID() == src_image.GetPixelID()
        image_types.add(out_image.GetPixelIDTypeAsString())
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(out_image), sitk.GetArrayViewFromImage(src_image))
        assert out_label.GetPixelID() == sitk.sitkUInt8
        expected = sitk.GetArrayFromImage(src_label).astype(np.uint8)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out_label), expected)
        assert set(np.unique(sitk.GetArrayViewFromImage(out_label))) == {0, 1, 2}
    assert image_types == {"8-bit unsigned integer", "32-bit float"}  # the subset has both kinds
    assert read(hippo_subset / "labelsTr" / f"{FLOAT_LABEL_CASE}.nii.gz").GetPixelID() == sitk.sitkFloat32
    assert not [p for p in workspace.raw.iterdir() if p.name.startswith(".")]


def test_msd_full_60_cases(hippo: Path, tmp_path: Path) -> None:
    source = detect_source(hippo)  # told apart from an nnU-Net folder by its dataset.json
    assert len(source.cases) == 60
    folder = build_dataset(source, tmp_path / "ws", name="Hippocampus")
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 60
    assert len(list((folder / "imagesTr").glob("*_0000.nii.gz"))) == 60
    assert len(list((folder / "labelsTr").glob("*.nii.gz"))) == 60
    for case in source.cases:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(folder / "labelsTr" / f"{case.case_id}.nii.gz"))
        reader.ReadImageInformation()
        assert reader.GetPixelID() == sitk.sitkUInt8
        src = read(case.channels[0])
        assert reader.GetSize() == src.GetSize() and reader.GetSpacing() == src.GetSpacing()
        assert reader.GetOrigin() == src.GetOrigin() and reader.GetDirection() == src.GetDirection()


def test_written_dataset_reads_in_nnunet(hippo_subset: Path, tmp_path: Path) -> None:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    folder = build_dataset(source_from_msd(hippo_subset), tmp_path / "ws", name="Hippo")
    meta = json.loads((folder / "dataset.json").read_text())
    files = get_filenames_of_train_images_and_targets(str(folder), meta)
    assert sorted(files) == sorted(c.case_id for c in source_from_msd(hippo_subset).cases)
    entry = files[FLOAT_LABEL_CASE]
    images, props = SimpleITKIO().read_images(entry["images"])
    seg, seg_props = SimpleITKIO().read_seg(entry["label"])
    assert images.shape[0] == 1 and images.shape[1:] == seg.shape[1:]
    assert props["spacing"] == seg_props["spacing"]


def _write_4d_msd(folder: Path, n_cases: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """An MSD task with 2-channel cases stored as 4D NIfTI (x, y, z, channel), like BrainTumour."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    truth, training = [], []
    for k in range(n_cases):
        channels = [image_array(10 * k + c) for c in range(2)]
        images = [OBLIQUE.apply_to(sitk.GetImageFromArray(a)) for a in channels]
        series = sitk.JoinSeries(images)  # 4D with the channel as 4th axis
        sitk.WriteImage(series, str(folder / "imagesTr" / f"brain_{k}.nii.gz"))
        label = label_array(k)
        write_image(label.astype(np.float32), folder / "labelsTr" / f"brain_{k}.nii.gz")
        truth.append((np.stack(channels), label))
        training.append({"image": f"./imagesTr/brain_{k}.nii.gz", "label": f"./labelsTr/brain_{k}.nii.gz"})
    meta = {
        "name": "Brain",
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "edema", "2": "tumour"},
        "numTraining": n_cases,
        "training": training,
    }
    (folder / "dataset.json").write_text(json.dumps(meta))
    return truth


def test_msd_4d_images_are_split_into_channels(tmp_path: Path) -> None:
    truth = _write_4d_msd(tmp_path / "Task01")
    source = detect_source(tmp_path / "Task01")
    assert source.channel_names == ["FLAIR", "T1w"]
    assert source.cases[0].channels == [ChannelFile(tmp_path / "Task01/imagesTr/brain_0.nii.gz", i) for i in (0, 1)]
    folder = build_dataset(source, tmp_path / "ws", name="Brain")
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "FLAIR", "1": "T1w"}
    assert meta["labels"] == {"background": 0, "edema": 1, "tumour": 2}
    for k, (channels, label) in enumerate(truth):
        for c in range(2):
            image = read(folder / "imagesTr" / f"brain_{k}_{c:04d}.nii.gz")
            assert image.GetDimension() == 3
            assert image.GetPixelID() == sitk.sitkFloat32
            assert_same_geometry(image, OBLIQUE)  # the 3D block of the 4D direction matrix
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), channels[c])
        out_label = read(folder / "labelsTr" / f"brain_{k}.nii.gz")
        assert out_label.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out_label), label)
    assert not (folder / "imagesTr" / "brain_0_0002.nii.gz").exists()


def test_nnunet_raw_source_with_mha_and_two_channels(tmp_path: Path) -> None:
    raw = tmp_path / "Dataset042_Organs"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    truth = {}
    for k in range(5):
        case_id = f"organ_{k:02d}"
        channels = [image_array(k * 10 + c, dtype=np.int16) for c in range(2)]
        for c, array in enumerate(channels):
            write_image(array, raw / "imagesTr" / f"{case_id}_{c:04d}.mha")
        label = label_array(k).astype(np.int32)  # stored wider than needed
        write_image(label, raw / "labelsTr" / f"{case_id}.mha")
        truth[case_id] = (channels, label)
    meta = {"channel_names": {"0": "CT", "1": "PET"}, "labels": CLASSES, "numTraining": 5, "file_ending": ".mha"}
    (raw / "dataset.json").write_text(json.dumps(meta))

    source = detect_source(raw)
    assert [c.case_id for c in source.cases] == sorted(truth)
    assert source.name == "Organs" and source.channel_names == ["CT", "PET"]
    folder = build_dataset(source, tmp_path / "ws", dataset_id=7, name=source.name)
    assert folder.name == "Dataset007_Organs"
    for case_id, (channels, label) in truth.items():
        for c in range(2):
            image = read(folder / "imagesTr" / f"{case_id}_{c:04d}.nii.gz")
            assert image.GetPixelID() == sitk.sitkInt16
            assert_same_geometry(image, OBLIQUE)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), channels[c])
        out_label = read(folder / "labelsTr" / f"{case_id}.nii.gz")
        assert out_label.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out_label), label)

    # An nnU-Net raw folder (our own output) is itself a valid source: rebuild it under another id.
    again = build_dataset(source_from_nnunet_raw(folder), tmp_path / "ws", dataset_id=8, name="Copy")
    for path in (folder / "imagesTr").iterdir():
        a, b = read(path), read(again / "imagesTr" / path.name)
        assert_same_grid(a, b)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


def _write_pairs(folder: Path, n: int = 5, label_values=(1, 2)) -> list[tuple[str, list[Path], Path]]:
    """Cases in patientNN/ folders: T1 as NRRD (float64), T2 as MHA (uint16), label as NRRD (int16)."""
    rows = []
    for k in range(n):
        case_dir = folder / f"patient{k:02d}"
        case_dir.mkdir(parents=True)
        t1, t2 = case_dir / "t1.nrrd", case_dir / "t2.mha"
        write_image(image_array(k, np.float64), t1)
        write_image(image_array(k + 50, np.uint16), t2)
        label = case_dir / "seg.nrrd"
        write_image(label_array(k, label_values).astype(np.int16), label)
        rows.append((f"patient{k:02d}", [t1, t2], label))
    return rows


def test_pairs_in_nrrd_and_mha_with_two_channel_files(tmp_path: Path) -> None:
    rows = _write_pairs(tmp_path / "in")
    source = source_from_pairs(rows, classes=CLASSES, channel_names=["T1", "T2"])
    folder = build_dataset(source, tmp_path / "ws", name="Pairs")
    for case_id, (t1, t2), label in rows:
        for c, (path, pixel) in enumerate(((t1, sitk.sitkFloat64), (t2, sitk.sitkUInt16))):
            out = read(folder / "imagesTr" / f"{case_id}_{c:04d}.nii.gz")
            assert out.GetPixelID() == pixel
            assert_same_grid(out, read(path), exact=False)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(read(path)))
        out_label = read(folder / "labelsTr" / f"{case_id}.nii.gz")
        assert out_label.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out_label), sitk.GetArrayFromImage(read(label)))
    assert json.loads((folder / "dataset.json").read_text())["channel_names"] == {"0": "T1", "1": "T2"}


def test_pairs_without_ids_or_classes(tmp_path: Path) -> None:
    """Ids come from folder + file name when file names repeat; classes from the values found,
    renumbered consecutively (nnU-Net's rule) with the original value kept in the name."""
    rows = _write_pairs(tmp_path / "in", label_values=(1, 3))
    source = source_from_pairs([(images[0], label) for _, images, label in rows])
    assert [c.case_id for c in source.cases] == [f"patient0{k}_seg" for k in range(5)]
    folder = build_dataset(source, tmp_path / "ws", name="Inferred")
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "label_1": 1, "label_3": 2}
    assert meta["channel_names"] == {"0": "channel_0"}
    written = sitk.GetArrayFromImage(read(folder / "labelsTr" / "patient01_seg.nii.gz"))
    original = sitk.GetArrayFromImage(read(rows[1][2]))
    np.testing.assert_array_equal(written, np.select([original == 3, original == 1], [2, 1], 0))


def test_in_memory_multichannel_volumes(tmp_path: Path) -> None:
    cases = [volume_case(f"case{k}", seed=k, n_channels=3) for k in range(5)]
    folder = build_dataset(volume_source(cases, n_channels=3), tmp_path / "ws", name="Arrays")
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1", "1": "T2", "2": "FLAIR"}
    for case in cases:
        for c, channel in enumerate(case.channels):
            image = read(folder / "imagesTr" / f"{case.case_id}_{c:04d}.nii.gz")
            assert image.GetPixelID() == sitk.sitkFloat32
            assert_same_geometry(image, OBLIQUE)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), channel.array)
        label = read(folder / "labelsTr" / f"{case.case_id}.nii.gz")
        assert_same_geometry(label, OBLIQUE)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), case.label.array)


def test_label_names_remap_cases_with_different_segment_orders(tmp_path: Path) -> None:
    """Slicer exports segments by list position: the same value means liver in one case, spleen in
    another. label_names puts each class on the table's value in every case."""
    base = label_array(0)  # values 1 and 2
    cases = [
        volume_case("a", 0, label=base, label_names={1: "liver", 2: "spleen"}),
        volume_case("b", 1, label=base, label_names={1: "spleen", 2: "liver"}),
        volume_case("c", 2, label=base * 3, label_names={3: "Liver", 6: "spleen"}),  # other values, other case
        volume_case("d", 3, label=base, label_names={1: "LIVER", 2: "Spleen"}),
        volume_case("e", 4, label=base, label_names={1: "liver", 2: "spleen"}),
    ]
    folder = build_dataset(volume_source(cases), tmp_path / "ws", name="Remap")
    a, b, c = (sitk.GetArrayFromImage(read(folder / "labelsTr" / f"{x}.nii.gz")) for x in "abc")
    np.testing.assert_array_equal(a, base)
    np.testing.assert_array_equal(b, np.select([base == 1, base == 2], [2, 1], 0))  # swapped
    np.testing.assert_array_equal(c, base)

    # Without a table, names define it: background, then names in order of first appearance.
    cases = [
        volume_case("a", 0, label=base, label_names={1: "kidney", 2: "liver"}),
        volume_case("b", 1, label=base, label_names={1: "liver", 2: "kidney"}),
        *(volume_case(f"x{k}", k, label=base, label_names={1: "kidney", 2: "liver"}) for k in range(3)),
    ]
    folder = build_dataset(volume_source(cases, classes=None), tmp_path / "ws2", name="Named")
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {"background": 0, "kidney": 1, "liver": 2}
    b = sitk.GetArrayFromImage(read(folder / "labelsTr" / "b.nii.gz"))
    np.testing.assert_array_equal(b, np.select([base == 1, base == 2], [2, 1], 0))


def test_geometry_within_tolerance_is_accepted_and_snapped(tmp_path: Path) -> None:
    nudged = Geometry(OBLIQUE.spacing, tuple(o + 1e-6 for o in OBLIQUE.origin), OBLIQUE.direction)
    cases = [volume_case("a", 0, label_geometry=nudged), *(volume_case(f"b{k}", k) for k in range(1, 5))]
    folder = build_dataset(volume_source(cases), tmp_path / "ws", name="Snap")
    image, label = read(folder / "imagesTr" / "a_0000.nii.gz"), read(folder / "labelsTr" / "a.nii.gz")
    assert_same_grid(image, label)  # label written on the image's grid exactly


def test_2d_cases(tmp_path: Path) -> None:
    geometry = Geometry((0.5, 0.7), (3.0, -4.0), (0.0, 1.0, -1.0, 0.0))
    cases = [
        Case(f"slice{k}", [Volume(image_array(k)[0], geometry)], Volume(label_array(k)[1], geometry)) for k in range(5)
    ]
    folder = build_dataset(volume_source(cases), tmp_path / "ws", name="Flat")
    for case in cases:
        image = read(folder / "imagesTr" / f"{case.case_id}_0000.nii.gz")
        label = read(folder / "labelsTr" / f"{case.case_id}.nii.gz")
        assert image.GetDimension() == 2 and label.GetDimension() == 2
        assert_same_geometry(image, geometry)
        assert_same_grid(image, label)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), case.channels[0].array)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), case.label.array)


def test_many_classes_use_wider_label_type(tmp_path: Path) -> None:
    values = list(range(1, 300))
    label = np.zeros(SHAPE, np.int32)
    label.flat[: len(values)] = values
    classes = {"background": 0, **{f"c{v}": v for v in values}}
    cases = [volume_case(x, i, label=label) for i, x in enumerate("abcde")]
    folder = build_dataset(volume_source(cases, classes=classes), tmp_path / "ws", name="Wide")
    out = read(folder / "labelsTr" / "a.nii.gz")
    assert out.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), label)
    assert ds.label_dtype(255) == np.uint8 and ds.label_dtype(256) == np.int16 and ds.label_dtype(40000) == np.int32


def test_progress_events(tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    cases = [volume_case(f"c{k}", k) for k in range(5)]
    build_dataset(volume_source(cases), tmp_path / "ws", name="P", progress=events.append)
    assert events and all(e.kind == "progress" for e in events)
    fractions = [e.data["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(isinstance(e.data["message"], str) and e.data["message"] for e in events)
    assert any("c4" in e.data["message"] for e in events)


# --------------------------------------------------------------------------------------------
# Bad input: every problem names its case, and nothing is written


def _bad(kind: str) -> tuple[list[Case], int, str, list[str]]:
    """(cases, n_channels, the bad case's id, phrases its message must contain)."""
    good = [volume_case(f"good{k}", k) for k in range(1, 5)]  # with the bad one: nnU-Net's 5 folds
    shifted = Geometry(OBLIQUE.spacing, (OBLIQUE.origin[0] + 3.0, *OBLIQUE.origin[1:]), OBLIQUE.direction)
    spaced = Geometry((0.8, 1.2, 3.0), OBLIQUE.origin, OBLIQUE.direction)
    turned = Geometry.identity(3, OBLIQUE.spacing)
    turned = Geometry(OBLIQUE.spacing, OBLIQUE.origin, turned.direction)
    if kind == "label shape":
        case = Case("bad", [Volume(image_array(0), OBLIQUE)], Volume(np.ones((6, 10, 9), np.uint8), OBLIQUE))
        return [*good, case], 1, "bad", ["label", "size 9x10x6", "channel 0's 8x10x6"]
    if kind == "label spacing":
        phrases = ["label", "spacing (0.8, 1.2, 3)", "(0.8, 1.2, 2.5)"]
        return [*good, volume_case("bad", label_geometry=spaced)], 1, "bad", phrases
    if kind == "label origin":
        return [*good, volume_case("bad", label_geometry=shifted)], 1, "bad", ["label", "origin (-9.5, 40.25, 7)"]
    if kind == "label direction":
        return [*good, volume_case("bad", label_geometry=turned)], 1, "bad", ["label", "direction"]
    if kind == "channel count":
        good = [volume_case(f"good{k}", k, n_channels=2) for k in range(1, 5)]
        return [*good, volume_case("bad", n_channels=1)], 2, "bad", ["1 channel(s), expected 2"]
    if kind == "channel grid":
        good = [volume_case(f"good{k}", k, n_channels=2) for k in range(1, 5)]
        case = volume_case("bad", n_channels=2)
        case.channels[1] = Volume(case.channels[1].array, spaced)
        return [*good, case], 2, "bad", ["channel 1", "spacing"]
    if kind == "unknown label value":
        label = label_array(0)
        label[0, 0, 0] = 3
        phrases = ["label values [3] not in the class table", "liver=1"]
        return [*good, volume_case("bad", label=label)], 1, "bad", phrases
    if kind == "non-integral label":
        label = label_array(0).astype(np.float32)
        label[0, 0, 0] = 1.5
        return [*good, volume_case("bad", label=label)], 1, "bad", ["non-integral", "1.5"]
    if kind == "NaN image":
        case = volume_case("bad")
        case.channels[0].array[2, 3, 4] = np.nan
        return [*good, case], 1, "bad", ["channel 0", "1 NaN/Inf voxel"]
    if kind == "Inf image":
        case = volume_case("bad")
        case.channels[0].array[0, :2, 0] = np.inf
        return [*good, case], 1, "bad", ["2 NaN/Inf voxel"]
    if kind == "ids differing in case":
        return [*good, volume_case("GOOD2", 9)], 1, "GOOD2", ["differs from case good2 only in letter case"]
    if kind == "one case":
        return [good[0]], 1, "good1", ["only 1 case", "at least 5"]
    if kind == "duplicate id":
        return [*good, volume_case("good2", 3)], 1, "good2", ["duplicate case id"]
    if kind == "unknown segment name":
        case = volume_case("bad", label_names={1: "liver", 2: "gallbladder"})
        return [*good, case], 1, "bad", ["'gallbladder'", "not in the class table"]
    if kind == "mixed 2D and 3D":
        flat = Geometry.identity(2)
        case = Case("bad", [Volume(image_array(0)[0], flat)], Volume(label_array(0)[1], flat))
        return [*good, case], 1, "bad", ["is 2D but case good1 is 3D"]
    if kind == "4D array":
        four_d = Volume(np.zeros((2, *SHAPE), np.float32), Geometry.identity(4))
        case = Case("bad", [four_d], Volume(label_array(0), OBLIQUE))
        return [*good, case], 1, "bad", ["channel 0", "4 dimensions"]
    if kind == "sheared direction":
        sheared = Geometry(OBLIQUE.spacing, OBLIQUE.origin, (1, 0.5, 0, 0, 1, 0, 0, 0, 1))
        return [*good, volume_case("bad", geometry=sheared, label_geometry=sheared)], 1, "bad", ["not orthonormal"]
    if kind == "invalid id":
        return [*good, volume_case("my/case")], 1, "my/case", ["invalid case id"]
    raise AssertionError(kind)


BAD_KINDS = [
    "label shape", "label spacing", "label origin", "label direction", "channel count", "channel grid",
    "unknown label value", "non-integral label", "NaN image", "Inf image", "ids differing in case", "one case",
    "duplicate id", "unknown segment name", "invalid id", "mixed 2D and 3D", "4D array", "sheared direction",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_is_rejected_naming_the_case(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cases, n_channels, bad_id, phrases = _bad(kind)
    writes = []
    monkeypatch.setattr(ds_build, "write_case", lambda *a, **k: writes.append(a))  # must never be reached
    with pytest.raises(DatasetError) as info:
        build_dataset(volume_source(cases, n_channels=n_channels), tmp_path / "ws", name="Test")
    message = str(info.value)
    assert f"case {bad_id}:" in message, message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert bad_id in info.value.case_ids
    assert "good1:" not in message or kind in ("one case",)  # good cases are not blamed
    assert writes == []  # validated everything before writing anything
    assert_nothing_written(tmp_path / "ws")


def _file_cases(folder: Path, n: int = 2) -> list[Case]:
    cases = []
    for k in range(n):
        image, label = folder / f"img{k}.nii.gz", folder / f"lab{k}.nii.gz"
        Volume(image_array(k), OBLIQUE).write(image)
        Volume(label_array(k), OBLIQUE).write(label)
        cases.append(Case(f"file{k}", [image], label))
    return cases


def test_unreadable_and_missing_files_are_reported_together(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    cases = _file_cases(folder, 4)
    (folder / "img1.nii.gz").write_bytes(b"not an image at all")           # corrupt
    (folder / "lab2.nii.gz").unlink()                                       # missing
    truncated = (folder / "img3.nii.gz").read_bytes()
    (folder / "img3.nii.gz").write_bytes(truncated[: len(truncated) // 2])  # header fine, data cut
    plain = folder / "img4.nii"  # uncompressed NIfTI cut short: ITK would zero-fill it as well
    Volume(image_array(4), OBLIQUE).write(plain, compress=False)
    plain.write_bytes(plain.read_bytes()[:-100])
    cases.append(Case("file4", [plain], cases[0].label))
    with pytest.raises(DatasetError) as info:
        build_dataset(DatasetSource(cases, CLASSES, ["MRI"]), tmp_path / "ws", name="Test")
    message = str(info.value)
    first_line, *lines = message.splitlines()
    assert first_line == "4 problems in 4 cases; nothing was written:"
    assert any("case file4:" in line and "img4.nii is truncated" in line and "header needs" in line for line in lines)
    assert any("case file1: channel 0: cannot read" in line and "img1.nii.gz" in line for line in lines), message
    assert any("case file2: label: file not found" in line and "lab2.nii.gz" in line for line in lines), message
    # ITK itself zero-fills a truncated .nii.gz silently; it must still be caught.
    assert any("case file3:" in line and "img3.nii.gz is truncated" in line for line in lines), message
    assert info.value.case_ids == ["file1", "file2", "file3", "file4"]
    assert "file0" not in message
    assert_nothing_written(tmp_path / "ws")


def test_plain_path_to_a_multichannel_file_is_rejected(tmp_path: Path) -> None:
    truth = _write_4d_msd(tmp_path / "Task")
    assert truth
    task = tmp_path / "Task"
    cases = [Case(f"b{k}", [task / f"imagesTr/brain_{k}.nii.gz"], task / f"labelsTr/brain_{k}.nii.gz") for k in range(2)]
    with pytest.raises(DatasetError, match=r"case b0: channel 0: .*holds 2 channels"):
        build_dataset(DatasetSource(cases, {"background": 0, "a": 1, "b": 2}), tmp_path / "ws", name="Test")
    assert_nothing_written(tmp_path / "ws")


def test_class_table_must_suit_nnunet(tmp_path: Path) -> None:
    # (Values with gaps are the files' own values now, renumbered: see test_intake_values.py.)
    cases = [volume_case(f"c{k}", k) for k in range(5)]
    with pytest.raises(DatasetError, match=r"gives several classes the value\(s\) \[1\]"):
        build_dataset(volume_source(cases, classes={"background": 0, "liver": 1, "spleen": 1}), tmp_path / "ws", name="Test")
    with pytest.raises(DatasetError, match=r"names one class twice"):
        build_dataset(volume_source(cases, classes={"background": 0, "Liver": 1, "liver ": 2}), tmp_path / "ws", name="Test")
    with pytest.raises(DatasetError, match=r"must not be negative, got \[-1\]"):
        build_dataset(volume_source(cases, classes={"background": 0, "liver": -1, "spleen": 2}), tmp_path / "ws", name="Test")
    with pytest.raises(DatasetError, match="no background"):
        build_dataset(volume_source(cases, classes={"liver": 1, "spleen": 2}), tmp_path / "ws", name="Test")
    assert_nothing_written(tmp_path / "ws")


def test_existing_dataset_is_never_destroyed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workspace = tmp_path / "ws"
    good = [volume_case(f"c{k}", k) for k in range(5)]
    folder = build_dataset(volume_source(good), workspace, name="Keep")
    before = snapshot(folder)

    # overwrite=False: a clear error, before anything is read.
    with pytest.raises(DatasetError, match="already exists.*overwrite"):
        build_dataset(volume_source(good), workspace, name="Keep")
    # overwrite=True but invalid input: the old dataset stays.
    bad_label = label_array(0)
    bad_label[0, 0, 0] = 9
    with pytest.raises(DatasetError, match="case broken: label values \\[9\\]"):
        bad_source = volume_source([*good, volume_case("broken", label=bad_label)])
        build_dataset(bad_source, workspace, name="Keep", overwrite=True)
    assert snapshot(folder) == before
    # overwrite=True and a failure while writing (disk full, file gone): the old dataset stays.
    real_write = ds_build.write_case
    calls = []

    def failing_write(plan, *args):
        calls.append(plan.case.case_id)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real_write(plan, *args)

    monkeypatch.setattr(ds_build, "write_case", failing_write)
    with pytest.raises(DatasetError, match="case c1: writing failed: No space left on device"):
        build_dataset(volume_source(good[:4] + [volume_case("c9", 9)]), workspace, name="Keep", overwrite=True)
    monkeypatch.undo()
    assert snapshot(folder) == before
    assert [p.name for p in (workspace / "nnUNet_raw").iterdir()] == ["Dataset001_Keep"]

    # overwrite=True with valid input replaces the dataset completely.
    new_source = volume_source([volume_case(f"x{k}", 5 + k) for k in range(5)])
    folder = build_dataset(new_source, workspace, name="Keep", overwrite=True)
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"x{k}.nii.gz" for k in range(5)]
    assert [p.name for p in (workspace / "nnUNet_raw").iterdir()] == ["Dataset001_Keep"]


def test_dataset_id_already_used_by_another_name(tmp_path: Path) -> None:
    (tmp_path / "ws" / "nnUNet_raw" / "Dataset001_Other").mkdir(parents=True)
    with pytest.raises(DatasetError, match="dataset id 1 is already used by .*Dataset001_Other"):
        build_dataset(volume_source([volume_case("a", 0), volume_case("b", 1)]), tmp_path / "ws", name="Test")
    assert_nothing_written(tmp_path / "ws")


# --------------------------------------------------------------------------------------------
# Records


def test_geometry_and_volume_records(tmp_path: Path) -> None:
    assert OBLIQUE.close_to(Geometry(OBLIQUE.spacing, tuple(o + 1e-6 for o in OBLIQUE.origin), OBLIQUE.direction))
    differences = OBLIQUE.differences(Geometry((0.8, 1.2, 2.0), (0, 0, 0), OBLIQUE.direction))
    assert [d.split()[0] for d in differences] == ["spacing", "origin"]
    assert Geometry.from_dict(OBLIQUE.to_dict()) == OBLIQUE
    with pytest.raises(ValueError, match="inconsistent geometry"):
        Geometry((1, 1, 1), (0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))

    volume = Volume(image_array(3, np.int16), OBLIQUE)
    path = volume.write(tmp_path / "v.nrrd")
    back = Volume.read(path)
    assert back.array.dtype == np.int16 and back.array.shape == SHAPE
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.geometry.close_to(OBLIQUE, 1e-6)
    assert volume.size == (8, 10, 6)
    assert Volume(np.zeros((3, 4))).geometry == Geometry.identity(2)


def test_parse_classes_and_pairs_csv(tmp_path: Path) -> None:
    assert ds.parse_classes("background=0, liver = 1,spleen=2") == CLASSES
    with pytest.raises(DatasetError, match="background=0,liver=1"):
        ds.parse_classes("background:0")
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("case_id,label,image,image2\nA,a/seg.nrrd,a/t1.nrrd,/abs/t2.mha\n\nB,b/seg.nrrd,b/t1.nrrd\n")
    rows = ds.read_pairs_csv(csv_path)
    assert rows == [
        ("A", [tmp_path / "a/t1.nrrd", Path("/abs/t2.mha")], tmp_path / "a/seg.nrrd"),
        ("B", [tmp_path / "b/t1.nrrd"], tmp_path / "b/seg.nrrd"),
    ]


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_dataset_from_msd_folder(hippo_subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    workdir = tmp_path / "ws"
    assert cli.main(["dataset", str(hippo_subset), "--workdir", str(workdir), "--id", "5"]) == 0
    out = capsys.readouterr().out
    folder = workdir / "nnUNet_raw" / "Dataset005_Hippocampus"
    assert "Dataset005_Hippocampus: 5 cases" in out
    assert "channels: 1 (MRI)" in out
    assert "background=0, Anterior=1, Posterior=2" in out
    assert str(folder) in out
    assert len(list((folder / "labelsTr").iterdir())) == 5

    # Again without --overwrite: a one-line error, exit status 2, dataset untouched.
    before = snapshot(folder)
    assert cli.main(["dataset", str(hippo_subset), "--workdir", str(workdir), "--id", "5"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert snapshot(folder) == before
    argv = ["dataset", str(hippo_subset), "--workdir", str(workdir), "--id", "5", "--name", "Hippocampus", "--overwrite"]
    assert cli.main(argv) == 0
    assert snapshot(folder).keys() == before.keys()


def test_cli_dataset_from_pairs_csv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = _write_pairs(tmp_path / "in")
    lines = ["case_id,label,image,image2"]  # relative paths (to the CSV) and one absolute
    lines += [f"{cid},{label.relative_to(tmp_path)},{a.relative_to(tmp_path)},{b}" for cid, (a, b), label in rows]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    workdir = tmp_path / "ws"
    argv = ["dataset", "--pairs-csv", str(tmp_path / "pairs.csv"), "--workdir", str(workdir),
            "--classes", "background=0,liver=1,spleen=2", "--channel-names", "T1,T2", "--name", "Csv", "--id", "12"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Dataset012_Csv: 5 cases" in out and "channels: 2 (T1, T2)" in out
    meta = json.loads((workdir / "nnUNet_raw/Dataset012_Csv/dataset.json").read_text())
    assert meta["labels"] == CLASSES and meta["channel_names"] == {"0": "T1", "1": "T2"}

    # A class table missing a value present in the labels: error naming each case, nothing written.
    argv[argv.index("background=0,liver=1,spleen=2")] = "background=0,liver=1"
    argv[argv.index("12")] = "13"
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "5 problems in 5 cases" in err and "case patient00: label values [2] not in the class table" in err
    assert not (workdir / "nnUNet_raw/Dataset013_Csv").exists()


def test_package_exports_resolve_lazily() -> None:
    """Every name of ``AutoNNUNetLib.dataset.__all__`` resolves, and the bare package loads no submodule."""
    import subprocess
    import sys

    for name in ds.__all__:
        assert getattr(ds, name) is not None, name
    code = ("import sys, AutoNNUNetLib.dataset; "
            "print(sorted(m for m in sys.modules if m.startswith('AutoNNUNetLib.dataset.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
