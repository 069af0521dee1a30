"""The scene's dataset export holds one case in memory at a time (AutoNNUNetSlicerLib.export).

Cases come from :class:`CaseReader` objects, as logic.case_reader builds them from scene nodes;
here they generate their voxels when read, like arrayFromVolume / ExportSegmentsToLabelmapNode
would. The peak traced memory (numpy buffers included) of exporting 20 cases must stay below
twice one case's size: copying all cases first, as the module once did, needs 20 times.
"""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from AutoNNUNetLib.imaging import Geometry, Volume

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "AutoNNUNet"))
from AutoNNUNetSlicerLib.export import CaseReader, export_dataset  # noqa: E402
from AutoNNUNetSlicerLib.terminology import SEGMENTS_KEY, SegmentLook, prediction_looks  # noqa: E402

LIVER_CODE = "SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~"
TUMOR_CODE = "SCT^49755003^Morphologically Altered Structure~SCT^108369006^Neoplasm~^^~Anatomic codes~^^~"

SHAPE = (40, 96, 96)  # K, J, I: 1.4 MB of float32 image + 0.4 MB of labels per case
GEOMETRY = Geometry(spacing=(0.9, 0.9, 2.5), origin=(-40.0, 12.5, 3.0), direction=tuple(np.eye(3).ravel()))


def _reader(index: int, reads: list) -> CaseReader:
    names = ["Liver", "Tumor"] if index % 2 == 0 else ["Tumor", "Liver"]  # segment order varies

    def read():
        reads.append(index)
        # Broadcast axes: the only full-size arrays are the case's own image and label.
        k = np.arange(SHAPE[0], dtype=np.float32)[:, None, None]
        j = np.arange(SHAPE[1], dtype=np.float32)[None, :, None]
        i = np.arange(SHAPE[2], dtype=np.float32)[None, None, :]
        image = np.empty(SHAPE, dtype=np.float32)
        np.add(k + j * 0.5 + index, i * 0.25, out=image)  # smooth: compresses fast
        label = np.zeros(SHAPE, dtype=np.uint8)
        label[:20, :48, :] = names.index("Liver") + 1  # ExportSegmentsToLabelmapNode: position + 1
        label[24:, :, 61:] = names.index("Tumor") + 1
        return [Volume(array=image, geometry=GEOMETRY)], label, GEOMETRY

    # Each case's segments carry their own colors; the first case's Tumor is uncoded, a later one coded.
    colors = {"Liver": (0.8, 0.2, 0.2), "Tumor": (0.2, 0.2, 0.9 - 0.1 * index)}
    codes = {"Liver": LIVER_CODE, "Tumor": TUMOR_CODE if index == 3 else ""}
    looks = [SegmentLook(n, colors[n], codes[n]) for n in names]
    return CaseReader(f"case{index:02d}", names, read, looks=looks)


def test_export_writes_consistent_classes_and_reads_each_case_once(tmp_path):
    reads: list = []
    folder = export_dataset([_reader(i, reads) for i in range(6)], ["CT"], {"Tumor": "Lesion"}, tmp_path, 3, "Stream")
    assert reads == list(range(6))  # each case read once, in order
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "Liver": 1, "Lesion": 2} and dataset["numTraining"] == 6
    first = Volume.read(folder / "labelsTr" / "case00.nii.gz")
    second = Volume.read(folder / "labelsTr" / "case01.nii.gz")
    assert np.array_equal(first.array, second.array)  # same classes whatever the segment order
    assert first.geometry.close_to(GEOMETRY)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".autonnunet-export-")]  # staging removed
    # Each class's look: the first segment's color (case00), the first terminology found (case03's
    # Tumor), recorded under the dataset's class names (the rename applied).
    assert dataset[SEGMENTS_KEY] == {
        "Liver": {"segment_name": "Liver", "color": [0.8, 0.2, 0.2], "terminology": LIVER_CODE},
        "Lesion": {"segment_name": "Tumor", "color": [0.2, 0.2, 0.9], "terminology": TUMOR_CODE}}
    looks = prediction_looks({"background": 0, "lesion": 2, "Liver": 1, "Other": 3}, dataset)
    assert [(n, x.color, x.terminology) for n, x in looks.items()] == [
        ("Liver", (0.8, 0.2, 0.2), LIVER_CODE), ("lesion", (0.2, 0.2, 0.9), TUMOR_CODE), ("Other", looks["Other"].color, "")]
    assert looks["Other"].color not in ((0.8, 0.2, 0.2), (0.2, 0.2, 0.9))  # no record: a distinct color


def test_export_of_20_cases_peaks_below_twice_one_case(tmp_path):
    one_case = np.zeros(SHAPE, np.float32).nbytes + np.zeros(SHAPE, np.uint8).nbytes
    # Warm up: first-time imports and caches are not what is measured.
    export_dataset([_reader(i, []) for i in range(5)], ["CT"], None, tmp_path / "warm", 1, "Warm")
    reads: list = []
    tracemalloc.start()
    try:
        export_dataset([_reader(i, reads) for i in range(20)], ["CT"], None, tmp_path / "work", 1, "Twenty")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(reads) == 20
    print(f"peak {peak / 1e6:.2f} MB, one case {one_case / 1e6:.2f} MB")
    assert peak < 2 * one_case, f"peak {peak / 1e6:.1f} MB for cases of {one_case / 1e6:.1f} MB"


def test_export_refuses_a_second_dataset_in_the_working_folder(tmp_path):
    (tmp_path / "nnUNet_raw" / "Dataset002_Other").mkdir(parents=True)
    reads: list = []
    with pytest.raises(ValueError, match="Dataset002_Other"):
        export_dataset([_reader(0, reads)], ["CT"], None, tmp_path, 1, "New")
    assert reads == []  # refused before any voxel was read
