"""The one class-name rule (dataset.classes): used by the Slicer side and by dataset validation alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AutoNNUNetLib.dataset import classes as cl
from AutoNNUNetLib.dataset.build import build_dataset
from AutoNNUNetLib.dataset.records import Case, DatasetError, DatasetSource
from AutoNNUNetLib.errors import AutoNNUNetError
from AutoNNUNetLib.imaging import Geometry, Volume

ORDERS = [["Liver", "Tumor"], ["Tumor", "Liver"], ["tumor ", "Vessel", "LIVER"], ["Vessel"]]


def test_names_fold_by_one_rule() -> None:
    assert cl.class_key("  Left   Kidney ") == cl.class_key("left kidney") == "left kidney"
    assert cl.class_key("STRASSE") == cl.class_key("straße")  # casefold, not lower
    assert cl.resolve_class_name("  Left   Kidney ") == "Left Kidney"
    assert cl.find_class_value({"Left Kidney": 3}, "left  KIDNEY") == 3
    assert cl.find_class_value({"liver": 1, "Liver": 2}, "Liver") == 2  # the exact spelling wins
    assert cl.find_class_value({"liver": 1}, "spleen") is None


def test_class_table_and_lookups_do_not_depend_on_segment_order() -> None:
    classes = cl.class_table_from_segment_names(ORDERS)
    assert classes == {"background": 0, "Liver": 1, "Tumor": 2, "Vessel": 3}
    assert cl.case_label_names(ORDERS[1]) == {1: "Tumor", 2: "Liver"}
    assert cl.segment_label_lookup(ORDERS[1], classes).tolist() == [0, 2, 1]
    assert cl.segment_label_lookup(ORDERS[2], classes).tolist() == [0, 2, 3, 1]
    exported = np.array([[0, 1, 2, 3]], dtype=np.uint8)  # segment position + 1
    remapped = cl.remap_case_labels(exported, ORDERS[2], classes)
    assert remapped.dtype == np.uint8 and remapped.tolist() == [[0, 2, 3, 1]]


def test_aliases_rename_and_merge() -> None:
    cases = [["Tumour", "Liver"], ["Tumor"], ["Kidney L", "Kidney R"]]
    aliases = {"tumour": "Tumor", "Kidney R": "Kidney", "Kidney L": "Kidney"}
    classes = cl.class_table_from_segment_names(cases, aliases)
    assert classes == {"background": 0, "Tumor": 1, "Liver": 2, "Kidney": 3}
    assert cl.segment_label_lookup(cases[2], classes, aliases).tolist() == [0, 3, 3]
    rows = [(r.segment_name, r.class_name, r.value, r.cases) for r in cl.class_rows(cases, aliases)]
    assert rows == [("Tumor", "Tumor", 1, 1), ("Tumour", "Tumor", 1, 1), ("Liver", "Liver", 2, 1),
                    ("Kidney L", "Kidney", 3, 1), ("Kidney R", "Kidney", 3, 1)]


def test_background_and_bad_names_are_library_errors() -> None:
    classes = cl.class_table_from_segment_names([["Background", "Organ"]])
    assert classes == {"background": 0, "Organ": 1}
    assert cl.segment_label_lookup(["BACKGROUND", "Organ"], classes).tolist() == [0, 0, 1]
    for call, phrase in [
        (lambda: cl.class_table_from_segment_names([["  "]]), "empty name"),
        (lambda: cl.segment_label_lookup(["Spleen"], classes), "not in the class table"),
        (lambda: cl.remap_case_labels(np.array([0, 3]), ["Organ"], classes), "outside"),
        (lambda: cl.parse_classes("liver:1"), "background=0,liver=1"),
    ]:
        with pytest.raises(DatasetError, match=phrase) as info:
            call()
        assert isinstance(info.value, AutoNNUNetError) and isinstance(info.value, ValueError)


def test_parse_classes_cleans_names() -> None:
    assert cl.parse_classes(" background=0,  left   kidney = 1 ,") == {"background": 0, "left kidney": 1}


def test_validation_matches_names_by_the_same_rule(tmp_path: Path) -> None:
    """A case whose segments are spelled "  TUMOR " and "liver" lands on the table's "Tumor" and "Liver"."""
    geometry = Geometry.identity(3)
    cases = []
    for index, names in enumerate([["Liver", "Tumor"], ["  TUMOR ", "liver"], ["Tumor", "Liver"],
                                   ["liver", "tumor"], ["LIVER", "TUMOR"]]):
        exported = np.zeros((4, 5, 6), np.uint8)
        exported[0] = 1 + [cl.class_key(n) for n in names].index("liver")
        exported[1] = 1 + [cl.class_key(n) for n in names].index("tumor")
        image = Volume(np.random.default_rng(index).normal(size=(4, 5, 6)).astype(np.float32), geometry)
        cases.append(Case(f"c{index}", [image], Volume(exported, geometry), cl.case_label_names(names)))
    classes = cl.class_table_from_segment_names([["Liver", "Tumor"]])
    folder = build_dataset(DatasetSource(cases, classes, ["MR"]), tmp_path / "ws", name="Names")
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {"background": 0, "Liver": 1, "Tumor": 2}
    for index in range(5):
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"c{index}.nii.gz")))
        assert (written[0] == 1).all() and (written[1] == 2).all() and (written[2:] == 0).all()


def test_contiguous_values_and_the_recorded_mapping(tmp_path: Path) -> None:
    table, renumber = cl.contiguous_values({"tz": 8, "bg": 0, "pz": 7})
    assert table == {"background": 0, "pz": 1, "tz": 2} and renumber == {0: 0, 7: 1, 8: 2}
    assert cl.contiguous_values({"background": 0, "a": 1}) == ({"background": 0, "a": 1}, {})
    assert cl.parse_classes("pz=7,tz=8") == {"background": 0, "pz": 7, "tz": 8}  # background implied
    assert cl.parse_classes("Background=0,pz=7") == {"Background": 0, "pz": 7}
    original = {0: 0, 1: 7, 2: 300}
    restored = cl.restore_original_labels(np.array([[0, 1], [2, 1]], np.uint8), original)
    assert restored.dtype == np.uint16 and restored.tolist() == [[0, 7], [300, 7]]
    with pytest.raises(DatasetError, match="outside 0..2"):
        cl.restore_original_labels(np.array([3]), original)
    huge = cl.restore_original_labels(np.array([1, 0]), {0: 0, 1: 2**40})  # no lookup of 2**40 entries
    assert huge.dtype == np.int64 and huge.tolist() == [2**40, 0]
    problems = cl.check_class_table({"background": 0, "ignore": 1, "liver": 2})
    assert [p.message for p in problems] == ["the 'ignore' class must have the highest value (nnU-Net's rule), got 1"]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({cl.ORIGINAL_LABELS_KEY: {"0": 0, "2": 8}}))
    with pytest.raises(DatasetError, match="must cover values 0..n-1"):
        cl.read_original_labels(path)
    path.write_text("{broken")
    with pytest.raises(DatasetError, match="cannot read .*dataset.json"):
        cl.read_original_labels(path)
    assert cl.read_original_labels({"labels": {"background": 0}}) is None
