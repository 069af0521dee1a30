"""Issue 12 items 12-15, 17: what the voxels and tables of real files can get wrong at intake.

Every file is written by SimpleITK (or nibabel) the way users' tools write them. Each refusal is
one message naming the case and the problem, and leaves the workspace empty.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from intake_cases import SHAPE, SPACING, image, label, nothing_written, pairs_folder, write
from AutoNNUNetLib.dataset.build import build_dataset
from AutoNNUNetLib.dataset.headers import nonfinite_voxels
from AutoNNUNetLib.dataset.records import DatasetError
from AutoNNUNetLib.dataset.sources import source_from_pairs


def refusal(rows, workdir: Path, **source_options) -> str:
    with pytest.raises(DatasetError) as info:
        build_dataset(source_from_pairs(rows, **source_options), workdir, name="Test")
    assert nothing_written(workdir)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# Item 12: NaN/Inf in NIfTI files, which SimpleITK reads as 0


def test_nan_and_inf_in_nifti_images_and_float_labels_are_found(tmp_path: Path) -> None:
    rows = pairs_folder(tmp_path / "in")
    bad_image = image(3)
    bad_image[1, 2, 3] = np.nan
    bad_image[0, 0, :2] = np.inf
    write(bad_image, rows[3][1][0])
    bad_label = label(1).astype(np.float32)
    bad_label[2, 2, 2] = -np.inf
    write(bad_label, rows[1][2])
    # Why a second reader is needed: SimpleITK hands the NaN/Inf back as 0.
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(rows[3][1][0])))).all()

    message = refusal(rows, tmp_path / "ws")
    assert "case c3: channel 0 (i3.nii.gz) has 3 NaN/Inf voxel(s)" in message
    assert "case c1: label map has 1 NaN/Inf voxel(s)" in message
    assert "case c0" not in message and "case c2" not in message


def test_nonfinite_voxels_helper(tmp_path: Path) -> None:
    array = image(0)
    array[0, 0, 0] = np.nan
    for ending in (".nii.gz", ".nii", ".nrrd", ".mha"):
        assert nonfinite_voxels(write(array, tmp_path / f"a{ending}")) == 1
    assert nonfinite_voxels(write(image(1), tmp_path / "clean.nii.gz")) == 0
    assert nonfinite_voxels(write(label(1), tmp_path / "int.nii.gz")) == 0
    # A 4D two-channel NIfTI written by nibabel: counted per channel.
    four_d = np.stack([array.T, image(2).T], axis=-1)
    nibabel.save(nibabel.Nifti1Image(four_d, np.eye(4)), str(tmp_path / "two.nii.gz"))
    assert [nonfinite_voxels(tmp_path / "two.nii.gz", c) for c in (0, 1)] == [1, 0]
    assert nonfinite_voxels(tmp_path / "two.nii.gz") == 1
    (tmp_path / "broken.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="cannot read broken.nii.gz"):
        nonfinite_voxels(tmp_path / "broken.nii.gz")


# --------------------------------------------------------------------------------------------
# Item 13: fewer than 5 cases cannot make nnU-Net's 5-fold split


@pytest.mark.parametrize("n", [2, 3, 4])
def test_two_to_four_cases_are_refused_at_intake(n: int, tmp_path: Path, capsys) -> None:
    from intake_cases import msd_folder
    from AutoNNUNetLib import cli

    folder = msd_folder(tmp_path, n=n)
    assert cli.main(["dataset", str(folder), "--workdir", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err.strip()
    ids = ", ".join(f"c{k}" for k in range(n))
    assert err.endswith(f"only {n} case(s) ({ids}); nnU-Net's 5-fold cross-validation needs at least 5 "
                        "(one validation case per fold): add labeled cases")
    assert nothing_written(tmp_path / "ws")


def test_five_cases_are_enough(tmp_path: Path) -> None:
    folder = build_dataset(source_from_pairs(pairs_folder(tmp_path / "in")), tmp_path / "ws", name="Five")
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 5


# --------------------------------------------------------------------------------------------
# Item 14: CSV headers in any order, Excel's BOM, comments; a cap on classes


def _csv(folder: Path, header: str, rows, prefix: str = "", encoding: str = "utf-8") -> Path:
    lines = [header]
    for case_id, (img,), lab in rows:
        cells = {"case_id": case_id, "image": img.name, "label": lab.name}
        lines.append(",".join(cells[name.strip().lower()] for name in header.split(",")))
    path = folder / "cases.csv"
    path.write_text(prefix + "\n".join(lines) + "\n", encoding=encoding)
    return path


@pytest.mark.parametrize("header", ["case_id,image,label", "label,case_id,image", "Case_ID, Label ,Image"])
def test_csv_header_decides_the_columns(header: str, tmp_path: Path) -> None:
    from AutoNNUNetLib.dataset.sources import read_pairs_csv

    rows = pairs_folder(tmp_path / "in")
    # Excel's "CSV UTF-8" writes a byte-order mark; people add comment lines above the header.
    path = _csv(tmp_path / "in", header, rows, prefix="# exported from the PACS\n\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf#")
    assert read_pairs_csv(path) == [(case_id, images, lab) for case_id, images, lab in rows]
    folder = build_dataset(source_from_pairs(read_pairs_csv(path)), tmp_path / "ws", name="Csv")
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "c2.nii.gz")))
    np.testing.assert_array_equal(written, label(2))  # the label, not the image


def test_csv_bom_before_the_header_and_bad_headers(tmp_path: Path) -> None:
    from AutoNNUNetLib.dataset.sources import read_pairs_csv

    rows = pairs_folder(tmp_path / "in")
    path = _csv(tmp_path / "in", "case_id,image,label", rows, encoding="utf-8-sig")
    assert [r[0] for r in read_pairs_csv(path)] == [f"c{k}" for k in range(5)]
    path.write_text("case_id,image,label,weight\nc0,i0.nii.gz,l0.nii.gz,1\n")
    with pytest.raises(DatasetError, match=r"^cases.csv line 1: unknown column\(s\) \['weight'\]"):
        read_pairs_csv(path)
    path.write_text("case_id,label,label\nc0,l0.nii.gz,l0.nii.gz\n")
    with pytest.raises(DatasetError, match="one label column"):
        read_pairs_csv(path)
    path.write_bytes(b"case_id,image,label\nc0,\xff\xfe.nii,l0.nii.gz\n")
    with pytest.raises(DatasetError, match="not a UTF-8 text file"):
        read_pairs_csv(path)


def test_an_intensity_image_given_as_label_is_refused_by_the_class_cap(tmp_path: Path) -> None:
    rows = pairs_folder(tmp_path / "in")
    # Case c2's "label" is an int16 MRI: hundreds of distinct intensities (its own, larger grid).
    mri = np.random.default_rng(0).normal(400, 150, (8, 10, 12)).clip(0).astype(np.int16)
    mri.flat[:300] = np.arange(1, 301)
    write(mri, rows[2][2])
    write(mri.astype(np.float32), rows[2][1][0])
    message = refusal(rows, tmp_path / "ws")
    assert "\n" not in message
    assert message.startswith("case c2: label map has ")
    assert "distinct values; at most 255 classes are taken from label values" in message
    assert "--classes" in message
    # With a class table, the unknown values are listed briefly, not all of them.
    message = refusal(rows, tmp_path / "ws", classes={"background": 0, "thing": 1})
    assert message.startswith("case c2: label values [") and "values) not in the class table" in message
    assert len(message) < 300


# --------------------------------------------------------------------------------------------
# Item 15: class tables on the files' own (non-contiguous) label values


def test_classes_named_on_original_values_are_renumbered_and_recorded(tmp_path: Path, capsys) -> None:
    from AutoNNUNetLib import cli
    from AutoNNUNetLib.dataset.classes import ORIGINAL_LABELS_KEY, read_original_labels, restore_original_labels

    rows = pairs_folder(tmp_path / "in", ending=".nrrd", values=(7, 8), label_dtype=np.int16)
    (tmp_path / "in" / "cases.csv").write_text(
        "case_id,image,label\n" + "".join(f"{c},{i[0].name},{lab.name}\n" for c, i, lab in rows))
    argv = ["dataset", "--pairs-csv", str(tmp_path / "in" / "cases.csv"), "--workdir", str(tmp_path / "ws"),
            "--name", "Prostate", "--classes", "pz=7,tz=8"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "classes:  background=0, pz=1, tz=2" in out and "1<-7, 2<-8" in out
    folder = tmp_path / "ws" / "nnUNet_raw" / "Dataset001_Prostate"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "pz": 1, "tz": 2}
    assert meta[ORIGINAL_LABELS_KEY] == {"0": 0, "1": 7, "2": 8}
    original = read_original_labels(folder / "dataset.json")
    assert original == {0: 0, 1: 7, 2: 8}
    for case_id, _, lab in rows:
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{case_id}.nii.gz")))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(lab)))
        assert set(np.unique(written)) == {0, 1, 2}
        np.testing.assert_array_equal(written, np.select([truth == 7, truth == 8], [1, 2], 0))
        np.testing.assert_array_equal(restore_original_labels(written, original), truth)

    # A table naming values the files do not hold: one line per case, nothing written.
    argv[argv.index("pz=7,tz=8")] = "pz=2"
    argv[argv.index("Prostate")] = "Wrong"
    assert cli.main(argv + ["--id", "2"]) == 2
    err = capsys.readouterr().err
    assert "case c0: label values [7, 8] not in the class table (background=0, pz=2)" in err
    assert not (tmp_path / "ws" / "nnUNet_raw" / "Dataset002_Wrong").exists()


def test_inferred_classes_record_the_original_values_too(tmp_path: Path) -> None:
    from AutoNNUNetLib.dataset.classes import read_original_labels

    rows = pairs_folder(tmp_path / "in", ending=".nrrd", values=(1, 7, 8, 9))
    folder = build_dataset(source_from_pairs(rows), tmp_path / "ws", name="Inferred")
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "label_1": 1, "label_7": 2, "label_8": 3, "label_9": 4}
    assert read_original_labels(meta) == {0: 0, 1: 1, 2: 7, 3: 8, 4: 9}
    # Values already 0, 1, 2, ...: nothing to record, and the reader says so.
    plain = build_dataset(source_from_pairs(pairs_folder(tmp_path / "in2", values=(1, 2))), tmp_path / "ws2", name="P")
    assert read_original_labels(plain / "dataset.json") is None


# --------------------------------------------------------------------------------------------
# Item 17: the case that lacks a channel is the one blamed, even when it is the first


def test_a_first_case_without_its_second_channel_is_the_one_blamed(tmp_path: Path) -> None:
    rows = pairs_folder(tmp_path / "in")
    rows = [(case_id, [*images, write(image(10 + k), tmp_path / "in" / f"t2_{k}.nii.gz")], lab)
            for k, (case_id, images, lab) in enumerate(rows)]
    rows[0] = (rows[0][0], rows[0][1][:1], rows[0][2])
    assert refusal(rows, tmp_path / "ws") == "case c0: has 1 channel(s), expected 2"
    # Named channels decide the count, as before.
    message = refusal(rows, tmp_path / "ws", channel_names=["T1"])
    assert message.startswith("4 problems in 4 cases") and "case c0" not in message


# --------------------------------------------------------------------------------------------
# Item 18: leftovers of killed builds, ids that collide by case, empty sources, empty labels


def test_all_background_cases_are_kept_with_a_warning(tmp_path: Path, caplog) -> None:
    from AutoNNUNetLib.dataset.validate import EMPTY_LABEL, NO_FOREGROUND

    rows = pairs_folder(tmp_path / "in")
    write(np.zeros(SHAPE, np.uint8), rows[3][2])
    events = []
    with caplog.at_level("WARNING"):
        folder = build_dataset(source_from_pairs(rows, classes={"background": 0, "thing": 1}), tmp_path / "ws",
                               name="Empty", progress=events.append)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "c3.nii.gz")))
    assert not written.any()
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [f"case c3: {EMPTY_LABEL}"]
    assert any(e.data["message"] == f"warning: case c3: {EMPTY_LABEL}" for e in events)
    # Without any foreground at all there is nothing to learn: refused.
    for _, _, lab in rows:
        write(np.zeros(SHAPE, np.uint8), lab)
    assert refusal(rows, tmp_path / "ws2") == NO_FOREGROUND


def test_stale_temporary_folders_of_killed_builds_are_cleaned(tmp_path: Path) -> None:
    import subprocess
    import sys

    from AutoNNUNetLib.dataset import build

    rows = pairs_folder(tmp_path / "in")
    raw = tmp_path / "ws" / "nnUNet_raw"
    # A real build killed while writing: a child process stops itself inside the write step.
    script = (
        "import os, signal, sys\n"
        "from AutoNNUNetLib.dataset import build\n"
        "from AutoNNUNetLib.dataset.sources import source_from_pairs\n"
        "real = build.write_case\n"
        "def dying(plan, *a):\n"
        "    real(plan, *a)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "build.write_case = dying\n"
        f"rows = [(c, [__import__('pathlib').Path(i[0])], __import__('pathlib').Path(l)) for c, i, l in {[(c, [str(i[0])], str(l)) for c, i, l in rows]!r}]\n"
        f"build.build_dataset(source_from_pairs(rows), {str(tmp_path / 'ws')!r}, name='Killed')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    left = [p.name for p in raw.iterdir()]
    assert len(left) == 1 and left[0].startswith(".Dataset001_Killed.tmp-"), left
    # A build of this process still writing is never touched; nor is an unrelated hidden file.
    live = raw / f".Dataset002_Live.tmp-{build._owner()}-abc"
    live.mkdir()
    (raw / ".DS_Store").write_bytes(b"finder")
    # An old-style leftover (no owner in its name) is removed once it is old enough.
    old = raw / ".Dataset003_Old.tmp-k2j3h4"
    old.mkdir()
    os.utime(old, (0, 0))

    folder = build_dataset(source_from_pairs(rows), tmp_path / "ws", name="Killed")
    assert sorted(p.name for p in raw.iterdir()) == sorted([".DS_Store", live.name, folder.name])


def test_a_backup_left_between_the_two_renames_is_restored(tmp_path: Path) -> None:
    from AutoNNUNetLib.dataset.build import clean_stale_builds

    raw = tmp_path / "nnUNet_raw"
    backup = raw / ".Dataset004_Keep.old-somehost-999999999-1a2b3c4d"  # a pid that cannot be alive
    (backup / "labelsTr").mkdir(parents=True)
    os.utime(backup, (0, 0))
    assert clean_stale_builds(raw) == [backup]
    assert (raw / "Dataset004_Keep" / "labelsTr").is_dir() and not backup.exists()


def test_ids_that_differ_only_in_case_and_empty_sources(tmp_path: Path) -> None:
    from intake_cases import msd_folder
    from AutoNNUNetLib.dataset.records import case_id_from_name
    from AutoNNUNetLib.dataset.sources import detect_source

    rows = pairs_folder(tmp_path / "in", n=6)
    rows[5] = ("C1", *rows[5][1:])
    assert refusal(rows, tmp_path / "ws") == (
        "case C1: case id differs from case c1 only in letter case (their files collide on macOS and Windows)")
    assert case_id_from_name("Patient 1", taken=["patient_1"]) == "Patient_1_2"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=f"^{empty} is empty: expected an MSD task or nnU-Net raw dataset folder"):
        detect_source(empty)
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=f"^{empty} has no dataset.json"):
        detect_source(empty)
    folder = msd_folder(tmp_path / "msd", n=1)
    meta = json.loads((folder / "dataset.json").read_text())
    meta["training"] = []
    (folder / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=f"^{folder} holds no cases"):
        detect_source(folder)


def test_nan_in_one_channel_of_a_4d_msd_image_names_that_channel(tmp_path: Path) -> None:
    from intake_cases import msd_folder
    from AutoNNUNetLib.dataset.headers import nonfinite_by_channel
    from AutoNNUNetLib.dataset.sources import detect_source

    folder = msd_folder(tmp_path, n=5)
    meta = json.loads((folder / "dataset.json").read_text())
    meta["modality"] = {"0": "FLAIR", "1": "T1w"}
    (folder / "dataset.json").write_text(json.dumps(meta))
    for k in range(5):
        second = image(20 + k)
        if k == 2:
            second[1, 1, 1] = np.nan
            second[2, 2, 2] = np.inf
        series = sitk.JoinSeries([sitk.GetImageFromArray(image(k)), sitk.GetImageFromArray(second)])
        series.SetSpacing((*SPACING, 1.0))  # the labels' grid
        sitk.WriteImage(series, str(folder / "imagesTr" / f"c{k}.nii.gz"))
    assert nonfinite_by_channel(folder / "imagesTr" / "c2.nii.gz") == [0, 2]
    spoiled = image(9)
    spoiled.flat[[3, 7]] = np.nan
    vector = sitk.Compose(sitk.GetImageFromArray(image(0)), sitk.GetImageFromArray(spoiled))
    sitk.WriteImage(vector, str(tmp_path / "vector.nrrd"))
    assert nonfinite_by_channel(tmp_path / "vector.nrrd") == [0, 2]
    with pytest.raises(DatasetError) as info:
        build_dataset(detect_source(folder), tmp_path / "ws", name="Brain")
    assert str(info.value) == "case c2: channel 1 (c2.nii.gz channel 1) has 2 NaN/Inf voxel(s)"
    assert nothing_written(tmp_path / "ws")


def test_a_sheared_file_grid_is_refused_like_a_sheared_array(tmp_path: Path) -> None:
    rows = pairs_folder(tmp_path / "in", ending=".nrrd")
    for path in (rows[1][1][0], rows[1][2]):
        sheared = sitk.ReadImage(str(path))
        sheared.SetDirection((1, 0.5, 0, 0, 1, 0, 0, 0, 1))  # NRRD keeps it; ITK normalises columns only
        sitk.WriteImage(sheared, str(path))
    message = refusal(rows, tmp_path / "ws")
    assert message.startswith("2 problems in 1 case")
    assert "case c1: channel 0: i1.nrrd: direction (1, 0.447214, 0, 0, 0.894427, 0, 0, 0, 1) is not orthonormal" in message
    assert "case c1: label: l1.nrrd: direction" in message


def test_workspace_and_table_mistakes_are_one_line_before_any_work(tmp_path: Path, capsys) -> None:
    from intake_cases import msd_folder
    from AutoNNUNetLib import cli

    folder = msd_folder(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    cases = [
        (["--workdir", str(tmp_path / "afile")], f"workspace {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file, not a folder"),
        (["--classes", "background=1,thing=0"], "'background' is value 0 in nnU-Net; got background=1"),
        (["--classes", f"thing={2**31}"], f"class values must be at most {2**31 - 1}, got [{2**31}]"),
        (["--channel-names", ","], "--channel-names ',' names no channel"),
    ]
    for extra, expected in cases:
        argv = ["dataset", str(folder), "--workdir", str(tmp_path / "ws"), *extra]
        if "--workdir" in extra:
            argv = ["dataset", str(folder), *extra]
        assert cli.main(argv) == 2, extra
        err = capsys.readouterr().err
        assert expected in err.splitlines()[0] or expected in err, (extra, err)
    assert nothing_written(tmp_path / "ws")


def test_an_uncompressed_nifti_named_nii_gz_is_named_as_such(tmp_path: Path) -> None:
    rows = pairs_folder(tmp_path / "in")
    plain = write(image(4), tmp_path / "in" / "plain.nii")
    rows[4][1][0].write_bytes(plain.read_bytes())  # what a renaming script leaves behind
    assert refusal(rows, tmp_path / "ws") == (
        "case c4: i4.nii.gz is named .nii.gz but is not gzip-compressed; rename it to .nii")
