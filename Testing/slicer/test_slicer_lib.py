"""The Slicer module's rules, tested without Slicer (was test_scene.py; scene.py is dissolved).

Geometry must survive scene -> files -> scene exactly (a prediction has to land on the input's
voxels; AutoNNUNetLib.imaging), classes must get the same label value in every case whatever the
segment order (AutoNNUNetLib.dataset.classes), and the module's own helpers
(AutoNNUNet/AutoNNUNetSlicerLib: colors, case ids, the results table) do what the panel shows.
Jobs are tested where they live: LocalJob in Testing/jobs/, RemoteJob in Testing/remote/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from AutoNNUNetLib import imaging
from AutoNNUNetLib.dataset import classes as class_rule
from AutoNNUNetLib.search import results as search_results

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "AutoNNUNet"))
from AutoNNUNetSlicerLib import colors as segment_colors, logic  # noqa: E402

sitk = pytest.importorskip("SimpleITK")


def rotation(axis: str, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


#: Oblique, non-unit-spacing grids as a Slicer volume node stores them (RAS directions as columns).
GRIDS = [
    ((0.8, 1.1, 2.7), (-12.5, 30.25, 4.0), rotation("z", 20) @ rotation("x", -35)),
    ((0.35, 0.35, 5.0), (101.0, -7.125, -250.5), rotation("y", 73) @ rotation("z", 11)),
    ((1.0, 2.0, 3.0), (0.0, 0.0, 0.0), np.diag([-1.0, 1.0, 1.0]) @ rotation("x", 90)),  # left-handed grid
]


# ---------------------------------------------------------------------------------------------
# geometry


@pytest.mark.parametrize("spacing, origin, directions", GRIDS)
def test_ras_lps_round_trip_is_exact(spacing, origin, directions):
    lps = imaging.lps_from_ras(spacing, origin, directions)
    back_spacing, back_origin, back_directions = imaging.ras_from_lps(*lps)
    assert back_spacing == tuple(spacing)
    assert back_origin == tuple(origin)
    assert np.array_equal(back_directions, directions)  # bit for bit: only signs change
    # LPS is RAS with the first two axes negated.
    assert lps[1] == (-origin[0], -origin[1], origin[2])
    assert np.array_equal(np.reshape(lps[2], (3, 3)), np.diag([-1.0, -1.0, 1.0]) @ directions)


@pytest.mark.parametrize("spacing, origin, directions", GRIDS)
def test_geometry_record_round_trip_and_matrix(spacing, origin, directions):
    geometry = imaging.geometry_from_ras(spacing, origin, directions)
    assert geometry.spacing == tuple(spacing)
    spacing2, origin2, directions2 = imaging.ras_from_geometry(geometry)
    assert spacing2 == tuple(spacing) and origin2 == tuple(origin) and np.array_equal(directions2, directions)
    # The 4x4 matrix is the one Slicer composes from the same fields, exactly.
    matrix = imaging.ijk_to_ras_from_geometry(geometry)
    assert np.array_equal(matrix, imaging.ijk_to_ras_matrix(spacing, origin, directions))
    # From a matrix alone (spacing recovered as column norms) we get back the same grid to rounding.
    again = imaging.geometry_from_ijk_to_ras(matrix, shape_kji=(5, 6, 7))
    np.testing.assert_allclose(again.spacing, spacing, rtol=1e-14)
    np.testing.assert_allclose(again.origin, geometry.origin, rtol=0, atol=1e-12)
    np.testing.assert_allclose(again.direction, geometry.direction, rtol=0, atol=1e-14)
    np.testing.assert_allclose(imaging.ijk_to_ras_from_geometry(again), matrix, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spacing, origin, directions", GRIDS)
def test_geometry_matches_simpleitk_index_to_physical(spacing, origin, directions):
    """SimpleITK's own voxel -> physical mapping, converted LPS -> RAS, equals Slicer's IJK-to-RAS."""
    geometry = imaging.geometry_from_ras(spacing, origin, directions)
    shape_kji = (4, 5, 6)
    image = geometry.apply_to(sitk.GetImageFromArray(np.zeros(shape_kji, dtype=np.float32)))
    assert image.GetSize() == (6, 5, 4)  # SimpleITK sizes are (i, j, k): the array is (k, j, i)
    ijk_to_ras = imaging.ijk_to_ras_from_geometry(geometry)
    for ijk in [(0, 0, 0), (5, 0, 0), (0, 4, 0), (0, 0, 3), (5, 4, 3), (2.5, 1.25, 0.5)]:
        lps = np.array(image.TransformContinuousIndexToPhysicalPoint(ijk))
        ras = np.array([-lps[0], -lps[1], lps[2]])
        expected = ijk_to_ras @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(ras, expected[:3], rtol=0, atol=1e-9)


def test_kji_array_order_is_simpleitk_order(tmp_path):
    """A voxel at Slicer's [k, j, i] is SimpleITK's pixel (i, j, k), at the same physical point."""
    from AutoNNUNetLib.dataset import Volume

    spacing, origin, directions = GRIDS[0]
    array = np.zeros((4, 5, 6), dtype=np.int16)
    array[3, 1, 4] = 7
    volume = Volume(array=array, geometry=imaging.geometry_from_ras(spacing, origin, directions))
    path = volume.write(tmp_path / "marker.nrrd")  # NRRD keeps the geometry in full precision
    image = sitk.ReadImage(str(path))
    assert image.GetPixel(4, 1, 3) == 7
    read = Volume.read(path)
    assert np.array_equal(read.array, array)
    spacing2, origin2, directions2 = imaging.ras_from_geometry(read.geometry)
    np.testing.assert_allclose(spacing2, spacing, rtol=1e-12)
    np.testing.assert_allclose(origin2, origin, atol=1e-9)
    np.testing.assert_allclose(directions2, directions, atol=1e-12)
    lps = image.TransformIndexToPhysicalPoint((4, 1, 3))
    ras = imaging.ijk_to_ras_matrix(spacing, origin, directions) @ np.array([4, 1, 3, 1.0])
    np.testing.assert_allclose([-lps[0], -lps[1], lps[2]], ras[:3], atol=1e-9)


def test_geometry_input_validation():
    with pytest.raises(ValueError):
        imaging.lps_from_ras((1.0, 0.0, 1.0), (0, 0, 0), np.eye(3))
    with pytest.raises(ValueError):
        imaging.geometry_from_ijk_to_ras(np.eye(3))
    with pytest.raises(ValueError):
        imaging.geometry_from_ijk_to_ras(np.eye(4), shape_kji=(4, 4))


# ---------------------------------------------------------------------------------------------
# classes from segment names


CASES = [
    ["Liver", "Tumor"],
    ["Tumor", "Liver"],
    ["tumor ", "Vessel", "LIVER"],
    ["Vessel"],
]


def test_class_table_is_consistent_across_segment_orders():
    classes = class_rule.class_table_from_segment_names(CASES)
    assert classes == {"background": 0, "Liver": 1, "Tumor": 2, "Vessel": 3}
    # Each case's export values (segment position + 1) name the right class...
    assert class_rule.case_label_names(CASES[0]) == {1: "Liver", 2: "Tumor"}
    assert class_rule.case_label_names(CASES[1]) == {1: "Tumor", 2: "Liver"}
    # ...and map to the same class value whatever the order.
    assert class_rule.segment_label_lookup(CASES[1], classes).tolist() == [0, 2, 1]
    assert class_rule.segment_label_lookup(CASES[2], classes).tolist() == [0, 2, 3, 1]
    assert class_rule.segment_label_lookup(CASES[3], classes).tolist() == [0, 3]


def test_remapped_label_maps_agree_voxel_for_voxel():
    """The same anatomy exported with different segment orders becomes the same class map."""
    classes = class_rule.class_table_from_segment_names(CASES)
    truth = np.zeros((3, 4, 5), dtype=np.uint8)  # class values
    truth[0, :2] = classes["Liver"]
    truth[1, 1:] = classes["Tumor"]
    truth[2, :, 3:] = classes["Vessel"]
    for names in CASES[:3]:
        present = [class_rule.class_key(n) for n in names]
        expected = np.where(
            np.isin(truth, [v for n, v in classes.items() if class_rule.class_key(n) in present]), truth, 0
        )
        # What ExportSegmentsToLabelmapNode writes for this segment order: position + 1.
        exported = np.zeros_like(truth)
        for position, name in enumerate(names):
            exported[truth == classes[next(k for k in classes if class_rule.class_key(k) == class_rule.class_key(name))]] = position + 1
        remapped = class_rule.remap_case_labels(exported, names, classes)
        assert remapped.dtype == np.uint8
        assert np.array_equal(remapped, expected)


def test_library_writes_the_same_class_values_for_any_segment_order(tmp_path):
    """End to end through dataset.build_dataset: per-case label_names -> one value per class."""
    from AutoNNUNetLib.dataset import Case, DatasetSource, Volume, build_dataset

    # Five cases: nnU-Net's 5-fold split needs one validation case per fold.
    segment_orders = [["Liver", "Tumor"], ["Tumor", "Liver"], ["tumor", "LIVER"], ["Liver", "Tumor"], ["TUMOR", "liver"]]
    classes = class_rule.class_table_from_segment_names(segment_orders)
    geometry = imaging.geometry_from_ras(*GRIDS[0])
    cases = []
    for index, names in enumerate(segment_orders):
        liver = np.zeros((6, 6, 6), dtype=bool)
        liver[1:3] = True
        tumor = np.zeros_like(liver)
        tumor[4:6, 2:4] = True
        exported = np.zeros((6, 6, 6), dtype=np.uint8)
        for position, name in enumerate(names):
            exported[liver if class_rule.class_key(name) == "liver" else tumor] = position + 1
        image = Volume(array=np.random.default_rng(index).normal(size=(6, 6, 6)).astype(np.float32), geometry=geometry)
        cases.append(Case(f"case{index}", [image], Volume(array=exported, geometry=geometry), class_rule.case_label_names(names)))
    folder = build_dataset(DatasetSource(cases=cases, classes=classes, channel_names=["CT"]), tmp_path, 7, "Order")
    labels = json.loads((folder / "dataset.json").read_text())["labels"]
    assert labels == {"background": 0, "Liver": 1, "Tumor": 2}
    written = [sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"case{i}.nii.gz"))) for i in range(5)]
    for array in written:
        assert np.array_equal(array, written[0])
        assert set(np.unique(array)) == {0, 1, 2}
        assert np.all(array[1:3] == 1) and np.all(array[4:6, 2:4] == 2)


def test_aliases_merge_and_rename_classes():
    cases = [["Tumour", "Liver"], ["Tumor"], ["Kidney L", "Kidney R"]]
    aliases = {"tumour": "Tumor", "Kidney R": "Kidney", "Kidney L": "Kidney"}
    classes = class_rule.class_table_from_segment_names(cases, aliases)
    assert classes == {"background": 0, "Tumor": 1, "Liver": 2, "Kidney": 3}
    assert class_rule.case_label_names(cases[0], aliases) == {1: "Tumor", 2: "Liver"}
    assert class_rule.segment_label_lookup(cases[2], classes, aliases).tolist() == [0, 3, 3]
    rows = class_rule.class_rows(cases, aliases)
    assert [(r.segment_name, r.class_name, r.value, r.cases) for r in rows] == [
        ("Tumor", "Tumor", 1, 1),
        ("Tumour", "Tumor", 1, 1),
        ("Liver", "Liver", 2, 1),
        ("Kidney L", "Kidney", 3, 1),
        ("Kidney R", "Kidney", 3, 1),
    ]


def test_background_segment_and_bad_names():
    classes = class_rule.class_table_from_segment_names([["Background", "Organ"]])
    assert classes == {"background": 0, "Organ": 1}
    assert class_rule.segment_label_lookup(["Background", "Organ"], classes).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="empty name"):
        class_rule.class_table_from_segment_names([["  "]])
    with pytest.raises(ValueError, match="not in the class table"):
        class_rule.segment_label_lookup(["Spleen"], classes)
    with pytest.raises(ValueError, match="outside"):
        class_rule.remap_case_labels(np.array([0, 3]), ["Organ"], classes)


def test_case_ids_are_safe_and_unique():
    assert logic.case_id_from_name("Patient 1: seg") == "Patient_1_seg"
    assert logic.case_id_from_name("a/b", taken=["a_b"]) == "a_b_2"
    assert logic.case_id_from_name("", taken=[]) == "case"


def test_distinct_colors():
    colors = segment_colors.distinct_colors(40)
    assert len(set(colors)) == 40
    assert all(0.0 <= c <= 1.0 for color in colors for c in color)
    # The first classes are clearly apart (not just different by rounding).
    first = np.array(colors[:10])
    distances = np.linalg.norm(first[:, None] - first[None], axis=-1) + np.eye(10)
    assert distances.min() > 0.2
    assert segment_colors.distinct_colors(3) == colors[:3]  # stable
    by_class = segment_colors.class_colors({"background": 0, "B": 2, "A": 1})
    assert set(by_class) == {"A", "B"} and by_class["A"] == colors[0] and by_class["B"] == colors[1]


# ---------------------------------------------------------------------------------------------
# results.json -> the trials table (search.results, read by the module)


def test_trial_rows_from_search_results(tmp_path):
    root = tmp_path / "search"
    model = root / "incumbent" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    model.mkdir(parents=True)
    (model / "plans.json").write_text("{}")
    results = {
        "trials": [
            {"trial_id": "1_0", "epochs": 3, "mean_dice": 0.6, "train_seconds": 30, "state": "success", "config": {"lr": 0.01},
             "model_dir": "configs/1_0/model"},
            {"trial_id": "2_0", "epochs": 3, "mean_dice": 0.7, "train_seconds": 90, "state": "success", "config": {}},
            {"trial_id": "3_0", "epochs": 3, "mean_dice": None, "train_seconds": None, "state": "failed", "config": {}},
            {"trial_id": "2_1", "epochs": 9, "mean_dice": 0.75, "train_seconds": 260, "state": "success", "config": {},
             "model_dir": str(tmp_path / "elsewhere")},
        ],
        "incumbent": "2_1",
        "incumbent_model_dir": str(model),
        "pareto_front": ["1_0", "2_0", "2_1"],
    }
    (root / "results.json").write_text(json.dumps(results))
    rows = search_results.trial_rows_from_results(search_results.read_results(root), root)
    assert [r.trial for r in rows] == ["1_0", "2_0", "3_0", "2_1"]
    assert [r.pareto for r in rows] == [True, True, False, True]
    assert [r.incumbent for r in rows] == [False, False, False, True]
    assert [r.state for r in rows] == ["succeeded", "succeeded", "failed", "succeeded"]
    assert rows[0].model_dir == root / "configs/1_0/model"  # relative to the search root
    assert rows[3].model_dir == model  # the incumbent's kept copy
    assert search_results.incumbent_model_dir(root, results) == model
    # Without the search's own front, it is computed from Dice and time.
    del results["pareto_front"]
    rows = search_results.trial_rows_from_results(results, root)
    assert [r.pareto for r in rows] == [True, True, False, True]
    assert search_results.read_results(tmp_path / "none") == {}
