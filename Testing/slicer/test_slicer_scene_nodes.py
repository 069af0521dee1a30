"""AutoNNUNetSlicerLib.logic against a stand-in of the few Slicer calls it makes.

Slicer cannot run here; logic.py imports ``slicer`` and ``vtk`` inside its functions, so a test
can hand it a small scene that behaves as Slicer 5.10's does for these calls (node ids, names,
attributes, ``ExportSegmentsToLabelmapNode`` adding a ``<segmentation>_ColorTable`` node). What
is checked is the module's own rule around each call: the export leaves the scene as it was,
predictions are tagged and never become training cases, the prediction's segments are the
model's classes with their voxels.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "AutoNNUNet"))
from AutoNNUNetSlicerLib import logic  # noqa: E402


class Segment:
    """vtkSegment's name, color and terminology entry string (5.10: Get/Set/HasTerminology)."""

    def __init__(self, name, color=(0.5, 0.5, 0.5), terminology=""):
        self.name, self.color, self.terminology = name, color, terminology

    def GetName(self):  # noqa: N802 - Slicer's spelling
        return self.name

    def SetColor(self, *rgb):  # noqa: N802
        self.color = rgb

    def GetColor(self):  # noqa: N802
        return self.color

    def GetTerminology(self):  # noqa: N802
        return self.terminology

    def SetTerminology(self, text):  # noqa: N802
        self.terminology = text

    def HasTerminology(self):  # noqa: N802
        return bool(self.terminology)


class Segmentation:
    def __init__(self, names=()):
        self.segments = {f"seg{i}": Segment(n) for i, n in enumerate(names)}

    def GetNumberOfSegments(self):  # noqa: N802
        return len(self.segments)

    def GetNthSegmentID(self, index):  # noqa: N802
        return list(self.segments)[index]

    def GetSegment(self, segment_id):  # noqa: N802
        return self.segments[segment_id]

    def RemoveAllSegments(self):  # noqa: N802
        self.segments.clear()

    def AddEmptySegment(self, segment_id, name):  # noqa: N802
        segment_id = segment_id or f"auto{len(self.segments)}"
        self.segments[segment_id] = Segment(name)
        return segment_id


class Node:
    def __init__(self, scene, cls, name):
        self.scene, self.cls, self.name, self.attributes = scene, cls, name, {}
        self.id = f"{cls}{len(scene.nodes) + 1}"
        self.segmentation = Segmentation()
        self.array = None
        self.calls: list[str] = []

    def GetID(self):  # noqa: N802
        return self.id

    def GetName(self):  # noqa: N802
        return self.name

    def IsA(self, cls):  # noqa: N802
        return self.cls == cls or (cls == "vtkMRMLScalarVolumeNode" and self.cls == "vtkMRMLLabelMapVolumeNode")

    def SetAttribute(self, key, value):  # noqa: N802
        self.attributes[key] = value

    def GetAttribute(self, key):  # noqa: N802
        return self.attributes.get(key)

    def GetSegmentation(self):  # noqa: N802
        return self.segmentation

    def __getattr__(self, name):  # CreateDefaultDisplayNodes, CreateClosedSurfaceRepresentation, ...
        if name[:1].isupper():
            return lambda *args: self.calls.append(name)
        raise AttributeError(name)


class Scene:
    def __init__(self):
        self.nodes: dict[str, Node] = {}

    def AddNewNodeByClass(self, cls, name=""):  # noqa: N802
        node = Node(self, cls, name)
        self.nodes[node.id] = node
        return node

    def RemoveNode(self, node):  # noqa: N802
        self.nodes.pop(node.id, None)

    def by_class(self, cls):
        return [n for n in self.nodes.values() if n.cls == cls]


@pytest.fixture
def scene(monkeypatch):
    """A scene plus the ``slicer``/``vtk`` names logic.py uses, installed as modules."""
    scene = Scene()
    masks: dict = {}

    def export(segmentation, ids, labelmap, reference):
        # Slicer adds a color table for the exported label map, named after the segmentation.
        scene.AddNewNodeByClass("vtkMRMLColorTableNode", f"{segmentation.GetName()}_ColorTable")
        labelmap.array = np.arange(len(ids.values) + 1, dtype=np.uint8).reshape(1, 1, -1)
        return True

    util = types.SimpleNamespace(
        getNodesByClass=scene.by_class,
        arrayFromVolume=lambda node: node.array,
        updateSegmentBinaryLabelmapFromArray=lambda mask, node, segment_id, reference: masks.__setitem__(
            node.segmentation.GetSegment(segment_id).GetName(), mask.copy()),
        setSliceViewerLayers=lambda **kwargs: None,
    )
    segmentations = types.SimpleNamespace(logic=lambda: types.SimpleNamespace(ExportSegmentsToLabelmapNode=export))
    slicer = types.SimpleNamespace(mrmlScene=scene, util=util, modules=types.SimpleNamespace(segmentations=segmentations))

    class StringArray:
        def __init__(self):
            self.values = []

        def InsertNextValue(self, value):  # noqa: N802
            self.values.append(value)

    monkeypatch.setitem(sys.modules, "slicer", slicer)
    monkeypatch.setitem(sys.modules, "vtk", types.SimpleNamespace(vtkStringArray=StringArray))
    scene.masks = masks
    return scene


def test_exporting_a_segmentation_leaves_no_color_table_behind(scene):
    kept = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "GenericAnatomyColors")  # the user's own
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Case 1 seg")
    segmentation.segmentation = Segmentation(["Liver", "Tumor"])
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Case 1")
    label = logic.export_label_array(segmentation, volume)
    assert label.tolist() == [[[0, 1, 2]]]  # value = segment position + 1
    assert [n.name for n in scene.by_class("vtkMRMLColorTableNode")] == [kept.name]
    assert scene.by_class("vtkMRMLLabelMapVolumeNode") == []  # the temporary label map too


def test_predictions_are_tagged_and_never_training_cases(scene):
    drawn = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    drawn.segmentation = Segmentation(["Liver"])
    scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    label = np.array([[[0, 1, 2, 2]]], dtype=np.uint8)
    predicted = logic.segmentation_from_label_array(label, volume, {"background": 0, "Liver": 1, "Tumor": 2},
                                                     show_3d=False)
    assert predicted.GetAttribute(logic.PREDICTION_ATTRIBUTE) and logic.is_prediction(predicted)
    assert [node.name for node, _ in logic.labeled_segmentations()] == ["drawn"]
    assert logic.segment_names(predicted) == ["Liver", "Tumor"]
    assert scene.masks["Tumor"].tolist() == [[[0, 0, 1, 1]]] and scene.masks["Liver"].tolist() == [[[0, 1, 0, 0]]]
    colors = [predicted.segmentation.GetSegment(s).color for s in logic.segment_ids(predicted)]
    assert len(set(colors)) == 2
    assert "CreateClosedSurfaceRepresentation" not in predicted.calls  # Show 3D off: no surfaces
    shown = logic.segmentation_from_label_array(label, volume, {"background": 0, "Liver": 1}, predicted)
    assert shown is predicted and logic.segment_names(predicted) == ["Liver"]  # refilled, not appended
    assert "CreateClosedSurfaceRepresentation" in predicted.calls


def test_training_segments_lend_the_predicted_ones_their_color_and_terminology(scene):
    from AutoNNUNetSlicerLib.terminology import prediction_looks

    liver = "SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes~^^~"
    drawn = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    drawn.segmentation.segments = {"a": Segment("Liver", (0.8, 0.1, 0.1), liver), "b": Segment("Tumor", (0.1, 0.9, 0.2))}
    looks = logic.segment_looks(drawn)
    assert [(x.name, x.color, x.terminology) for x in looks] == [("Liver", (0.8, 0.1, 0.1), liver),
                                                                  ("Tumor", (0.1, 0.9, 0.2), "")]
    from AutoNNUNetSlicerLib.terminology import class_looks, looks_entry

    dataset_json = {"labels": {"background": 0, "Liver": 1, "Tumor": 2},
                    "autonnunet_segments": looks_entry(class_looks([looks]))}
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    classes = {"background": 0, "Liver": 1, "Tumor": 2}
    predicted = logic.segmentation_from_label_array(np.array([[[0, 1, 2]]], np.uint8), volume, classes,
                                                     show_3d=False, looks=prediction_looks(classes, dataset_json))
    segments = [predicted.segmentation.GetSegment(s) for s in logic.segment_ids(predicted)]
    assert [(x.name, x.color, x.terminology) for x in segments] == [("Liver", (0.8, 0.1, 0.1), liver),
                                                                     ("Tumor", (0.1, 0.9, 0.2), "")]


def test_sample_data_becomes_labeled_cases_on_the_generated_grids(scene):
    from AutoNNUNetLib.demo import generate_case
    from AutoNNUNetLib.imaging import ijk_to_ras_from_geometry

    added = []

    def add_volume(array, ijkToRAS=None, name=None):  # noqa: N803 - slicer.util's keyword
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        node.array, node.ijk_to_ras = array, ijkToRAS
        added.append(node)
        return node

    sys.modules["slicer"].util.addVolumeFromArray = add_volume
    cases, channels = logic.add_sample_cases(count=2)
    assert channels == ["T1", "T2"] and [c.case_id for c in cases] == ["sample0", "sample1"]
    channel_volumes, label = generate_case(1)
    second = cases[1]
    assert [v.name for v in second.volume_nodes] == ["sample1 T1", "sample1 T2"]
    assert np.array_equal(second.volume_nodes[1].array, channel_volumes[1].array)
    np.testing.assert_allclose(second.volume_nodes[0].ijk_to_ras, ijk_to_ras_from_geometry(label.geometry))
    assert logic.segment_names(second.segmentation_node) == ["rim", "core"]
    assert [n.name for n, _ in logic.labeled_segmentations()] == ["sample0 seg", "sample1 seg"]
    assert scene.masks["core"].sum() == (label.array == 2).sum()  # the last case's masks
