"""Scene nodes <-> the library's records. The only module here that touches MRML nodes.

Slicer volumes carry spacing, origin and IJK-to-RAS directions in RAS; the library's
:class:`~AutoNNUNetLib.imaging.Geometry` and the image files are LPS. The conversion
(``imaging.geometry_from_ras``) flips the sign of the first two axes, which is exact, so a volume
exported from the scene and a prediction loaded back land on the same voxels. Slicer's
``arrayFromVolume`` returns KJI order, which is SimpleITK's (z, y, x): arrays pass unchanged.

``slicer`` and ``vtk`` are imported inside the functions, so the module imports without Slicer
(the rules around these calls are tested with plain numpy in Testing/slicer/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

#: Node attribute marking a segmentation this module created from a prediction, so that
#: *Add all labeled volumes* does not add the module's own output as training data.
PREDICTION_ATTRIBUTE = "AutoNNUNet.Prediction"


@dataclass
class SceneCase:
    """One training case as picked in the cases table (nodes, not copies of their voxels)."""

    case_id: str
    segmentation_node: Any  # vtkMRMLSegmentationNode
    volume_nodes: list = field(default_factory=list)  # vtkMRMLScalarVolumeNode per channel, in order


def case_id_from_name(name: str, taken=()) -> str:
    """A file-name-safe, unique case id from a node name ("Patient 1 seg" -> "Patient_1_seg")."""
    cleaned = "".join(c if c.isalnum() or c == "-" else "_" for c in str(name).strip())
    cleaned = "_".join(part for part in cleaned.split("_") if part) or "case"
    taken = set(taken)
    candidate, number = cleaned, 2
    while candidate in taken:
        candidate = f"{cleaned}_{number}"
        number += 1
    return candidate


# -- segmentations ---------------------------------------------------------------------------------


def reference_volume(segmentation_node):
    """The volume a segmentation was drawn on (its reference image geometry), if in the scene."""
    if segmentation_node is None:
        return None
    node = segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        return None
    return node


def is_prediction(segmentation_node) -> bool:
    return bool(segmentation_node.GetAttribute(PREDICTION_ATTRIBUTE))


def labeled_segmentations() -> list:
    """(segmentation, reference volume or None) for every segmentation with segments that is not
    one of this module's predictions."""
    import slicer

    found = []
    for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
        if node.GetSegmentation().GetNumberOfSegments() == 0 or is_prediction(node):
            continue
        found.append((node, reference_volume(node)))
    return found


def segment_ids(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def segment_names(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetSegment(s).GetName() for s in segment_ids(segmentation_node)]


def segment_looks(segmentation_node) -> list:
    """Each segment's name, color and terminology entry string (terminology.SegmentLook), in order."""
    from .terminology import SegmentLook

    segmentation = segmentation_node.GetSegmentation()
    looks = []
    for segment_id in segment_ids(segmentation_node):
        segment = segmentation.GetSegment(segment_id)
        terminology = segment.GetTerminology() if segment.HasTerminology() else ""
        looks.append(SegmentLook(segment.GetName(), tuple(segment.GetColor()), terminology or ""))
    return looks


# -- volumes ---------------------------------------------------------------------------------------


def volume_geometry(volume_node):
    """The node's grid as an imaging.Geometry (LPS), exactly as stored."""
    import slicer
    import vtk

    from AutoNNUNetLib.imaging import geometry_from_ras

    directions = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASDirectionMatrix(directions)
    return geometry_from_ras(volume_node.GetSpacing(), volume_node.GetOrigin(),
                             slicer.util.arrayFromVTKMatrix(directions)[:3, :3])


def volume_from_node(volume_node, copy: bool = False):
    """An imaging.Volume of the node's voxels (KJI = z, y, x) and its LPS geometry.

    Without ``copy`` the array is a view of the node's image data: write it out before the node
    changes (the dataset export does, case by case).
    """
    import slicer

    from AutoNNUNetLib.imaging import Volume

    array = slicer.util.arrayFromVolume(volume_node)
    return Volume(array=array.copy() if copy else array, geometry=volume_geometry(volume_node))


def export_label_array(segmentation_node, reference):
    """The segmentation as a label array on ``reference``'s grid, value = segment position + 1.

    ``ExportSegmentsToLabelmapNode`` also adds a ``<segmentation>_ColorTable`` node to the
    scene; it is removed with the temporary label map, so exporting leaves the scene as it was.
    """
    import slicer
    import vtk

    ids = vtk.vtkStringArray()
    for segment_id in segment_ids(segmentation_node):
        ids.InsertNextValue(segment_id)
    scene = slicer.mrmlScene
    colors_before = {n.GetID() for n in slicer.util.getNodesByClass("vtkMRMLColorTableNode")}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "AutoNNUNet export")
    try:
        # An explicit segment list (and no color table) fixes the values to list positions.
        if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference):
            raise ValueError(f"exporting segmentation '{segmentation_node.GetName()}' to a label map failed")
        return slicer.util.arrayFromVolume(labelmap).copy()
    finally:
        scene.RemoveNode(labelmap)
        for node in slicer.util.getNodesByClass("vtkMRMLColorTableNode"):
            if node.GetID() not in colors_before:
                scene.RemoveNode(node)


def check_cases(cases: Sequence[SceneCase], n_channels: int) -> list[tuple[Optional[str], str]]:
    """``(case id, problem)`` for what the library cannot see: missing nodes, transforms."""
    problems: list[tuple[Optional[str], str]] = []
    ids = [c.case_id for c in cases]
    for case in cases:
        if ids.count(case.case_id) > 1:
            problems.append((case.case_id, "case name used twice"))
        if case.segmentation_node is None:
            problems.append((case.case_id, "no segmentation selected"))
        elif case.segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
            problems.append((case.case_id, f"segmentation '{case.segmentation_node.GetName()}' has no segments"))
        volumes = list(case.volume_nodes)[:n_channels]
        if len(volumes) < n_channels or any(v is None for v in volumes):
            problems.append((case.case_id, f"pick a volume for each of the {n_channels} channel(s)"))
        for node in [case.segmentation_node, *volumes]:
            if node is not None and node.GetParentTransformNode() is not None:
                # Files store a grid, not a transform: harden it so what is exported is what is seen.
                problems.append((case.case_id, f"'{node.GetName()}' is under a transform; harden the transform first"))
        for volume in volumes:
            image = volume.GetImageData() if volume is not None else None
            if image is not None and image.GetNumberOfScalarComponents() != 1:
                problems.append((case.case_id, f"'{volume.GetName()}' is not a scalar volume (split its components into channels)"))
    if not cases:
        problems.append((None, "no cases: add labeled volumes first"))
    return problems


def case_reader(case: SceneCase, n_channels: int):
    """The export's view of one scene case: its segment names, and a function that reads its
    voxels only when the export gets to it (see export.py)."""
    from .export import CaseReader

    volumes = list(case.volume_nodes)[:n_channels]

    def read():
        label = export_label_array(case.segmentation_node, volumes[0])
        return [volume_from_node(v) for v in volumes], label, volume_geometry(volumes[0])

    return CaseReader(case.case_id, segment_names(case.segmentation_node), read,
                      looks=segment_looks(case.segmentation_node))


def add_sample_cases(count: int = 6, seed: int = 0) -> tuple[list[SceneCase], list[str]]:
    """Generated labeled cases (the ``autonnunet demo`` data: T1 and T2 channels, classes "rim"
    and "core", oblique anisotropic grids) as volume and segmentation nodes in the scene."""
    import slicer

    from AutoNNUNetLib.demo import DEMO_CHANNELS, DEMO_CLASSES, generate_case
    from AutoNNUNetLib.imaging import ijk_to_ras_from_geometry

    cases = []
    for index in range(count):
        channels, label = generate_case(seed + index)
        matrix = ijk_to_ras_from_geometry(label.geometry)
        volumes = [slicer.util.addVolumeFromArray(channel.array, ijkToRAS=matrix, name=f"sample{index} {name}")
                   for channel, name in zip(channels, DEMO_CHANNELS)]
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"sample{index} seg")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volumes[0])
        for name, value in DEMO_CLASSES.items():
            if value:
                segment_id = segmentation.GetSegmentation().AddEmptySegment("", name)
                slicer.util.updateSegmentBinaryLabelmapFromArray(
                    (label.array == value).astype("uint8"), segmentation, segment_id, volumes[0])
        cases.append(SceneCase(f"sample{index}", segmentation, volumes))
    return cases, list(DEMO_CHANNELS)


# -- models and predictions ------------------------------------------------------------------------


def load_label_file(path, reference, classes: dict, segmentation_node=None, show_3d: bool = True, looks=None):
    """A prediction file as named, colored segments on ``reference``'s grid (checked first)."""
    from AutoNNUNetLib.imaging import Volume

    prediction = Volume.read(path)
    expected = volume_geometry(reference)
    if not prediction.geometry.close_to(expected):
        raise ValueError(f"the prediction's grid differs from '{reference.GetName()}': "
                         + "; ".join(prediction.geometry.differences(expected)))
    return segmentation_from_label_array(prediction.array, reference, classes, segmentation_node, show_3d, looks)


def segmentation_from_label_array(label_array, reference, classes: dict, segmentation_node=None, show_3d: bool = True,
                                  looks=None):
    """A segmentation node with one segment per class of the table, on the reference grid,
    tagged as a prediction (see :data:`PREDICTION_ATTRIBUTE`). ``looks`` (terminology.prediction_looks)
    gives each segment the color and terminology of the class's training segments."""
    import slicer

    from .terminology import prediction_looks

    if segmentation_node is None:
        segmentation_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{reference.GetName()} AutoNNUNet")
    segmentation_node.SetAttribute(PREDICTION_ATTRIBUTE, "1")
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    segmentation = segmentation_node.GetSegmentation()
    segmentation.RemoveAllSegments()  # the node shows this prediction only
    looks = looks if looks is not None else prediction_looks(classes)
    for name, value in sorted(classes.items(), key=lambda item: item[1]):
        if value == 0:
            continue
        segment_id = segmentation.AddEmptySegment("", name)  # Slicer picks a unique id
        segment = segmentation.GetSegment(segment_id)
        segment.SetColor(*looks[name].color)
        if looks[name].terminology:
            segment.SetTerminology(looks[name].terminology)
        mask = (label_array == value).astype("uint8")
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation_node, segment_id, reference)
    if show_3d:  # surfaces can take minutes on large volumes
        segmentation_node.CreateClosedSurfaceRepresentation()
    segmentation_node.SetDisplayVisibility(True)
    slicer.util.setSliceViewerLayers(background=reference)
    return segmentation_node
