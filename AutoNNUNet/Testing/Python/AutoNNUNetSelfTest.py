"""The AutoNNUNet self-test, run inside Slicer (module's *Reload and Test*, or ctest).

Synthetic labeled scene -> dataset -> fingerprint -> tiny search -> segmentation of a new oblique
volume, checked on the output node's own geometry and on the Dice of both classes: a centred
sphere (which survives an axis flip) and an off-centre box (which does not).

Without the dependencies (torch, nnunetv2, NePS: the extension build factory has none) the test
is skipped with the reason, instead of failing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from AutoNNUNetSlicerLib import install, parameters
from AutoNNUNetSlicerLib import logic as scenelogic
from AutoNNUNetSlicerLib.logic import SceneCase

#: A tiny search: the quick profile with nnU-Net's default trained first, so the incumbent has
#: seen enough iterations to find a bright sphere and a darker box.
SEARCH_VALUES = {"searchSpace": "HPO", "profile": "quick", "totalEpochs": 0, "wallTimeHours": 0.0, "maxTrials": 2,
                 "minEpochs": 1, "maxEpochs": 9, "folds": "0", "iterationsPerEpoch": 20, "priorFirst": True,
                 "runtimeWeight": 1.0, "device": "cpu"}


class AutoNNUNetTest(ScriptedLoadableModuleTest):
    SHAPE = (24, 28, 32)  # K, J, I
    DICE_THRESHOLD = 0.5
    COLORS = {"Sphere": (0.85, 0.65, 0.1), "Box": (0.2, 0.45, 0.9)}
    #: A Segment Editor terminology entry string (category ~ type ~ modifier ~ anatomic region ...).
    TERMINOLOGY = {"Sphere": "Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue"
                             "~SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list~^^~^^"}

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def missingDependencies(self) -> list:
        return install.missing_requirements()

    def runTest(self) -> None:
        self.setUp()
        self.test_geometry_round_trip()
        missing = self.missingDependencies()
        if missing:
            # Reload and Test calls runTest directly: say why, and do not fail.
            self.delayDisplay("Search test skipped: missing dependencies " + ", ".join(missing)
                              + " (install them in the module's Setup section)")
            return
        self.setUp()
        self.test_search_and_segment()

    # -- synthetic data ---------------------------------------------------------------------------

    @classmethod
    def _syntheticCase(cls, seed: int):
        """An image with a bright sphere near the centre and a darker box in a corner (1 sphere, 2 box)."""
        import numpy as np

        rng = np.random.default_rng(seed)
        k, j, i = np.indices(cls.SHAPE)
        center = np.array(cls.SHAPE) / 2 + rng.uniform(-3, 3, size=3)
        sphere = ((k - center[0]) ** 2 + (j - center[1]) ** 2 + (i - center[2]) ** 2) < rng.uniform(5, 7) ** 2
        box = (k > 3) & (k < 9) & (j > 4) & (j < 12) & (i > 20) & (i < 28) & ~sphere
        image = rng.normal(0, 10, cls.SHAPE) + 100 * sphere + 50 * box
        truth = np.zeros(cls.SHAPE, dtype=np.uint8)
        truth[sphere] = 1
        truth[box] = 2
        return image.astype(np.float32), truth

    def _addVolume(self, array, name: str, oblique: bool = False):
        import numpy as np

        node = slicer.util.addVolumeFromArray(array, name=name)
        node.SetSpacing(0.8, 1.1, 1.7)
        node.SetOrigin(-12.5, 30.25, 4.0)
        if oblique:
            angle = np.deg2rad(20)
            rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
            matrix = np.block([[rotation, np.zeros((3, 1))], [np.zeros((1, 3)), np.ones((1, 1))]])
            node.SetIJKToRASDirectionMatrix(slicer.util.vtkMatrixFromArray(matrix))
        return node

    def _addSegmentation(self, truth, volume, names: list):
        """A segmentation with the truth's segments added in ``names`` order (Sphere = 1, Box = 2)."""
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", volume.GetName() + " seg")
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        values = {"Sphere": 1, "Box": 2}
        for name in names:
            segmentId = node.GetSegmentation().AddEmptySegment(name, name)
            segment = node.GetSegmentation().GetSegment(segmentId)
            segment.SetColor(*self.COLORS[name])
            if name in self.TERMINOLOGY:
                segment.SetTerminology(self.TERMINOLOGY[name])
            slicer.util.updateSegmentBinaryLabelmapFromArray((truth == values[name]).astype("uint8"), node, segmentId, volume)
        return node

    # -- tests ------------------------------------------------------------------------------------

    def test_geometry_round_trip(self) -> None:
        """Volume node -> Geometry (LPS) -> file -> back lands on the same IJK-to-RAS, exactly."""
        import numpy as np

        from AutoNNUNetLib.imaging import ijk_to_ras_from_geometry

        self.delayDisplay("Geometry round trip")
        image, _ = self._syntheticCase(0)
        node = self._addVolume(image, "oblique", oblique=True)
        geometry = scenelogic.volume_geometry(node)
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        np.testing.assert_allclose(ijk_to_ras_from_geometry(geometry), slicer.util.arrayFromVTKMatrix(matrix), rtol=0, atol=1e-12)
        path = Path(slicer.util.tempDirectory()) / "roundtrip.nrrd"
        scenelogic.volume_from_node(node).write(path)
        loaded = slicer.util.loadVolume(str(path))
        loadedMatrix = vtk.vtkMatrix4x4()
        loaded.GetIJKToRASMatrix(loadedMatrix)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(loadedMatrix), slicer.util.arrayFromVTKMatrix(matrix), rtol=0, atol=1e-9)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded), slicer.util.arrayFromVolume(node))
        self.delayDisplay("Geometry round trip passed")

    def test_search_and_segment(self) -> None:
        import numpy as np

        from AutoNNUNet import AutoNNUNetLogic

        missing = self.missingDependencies()
        if missing:
            self.skipTest("missing dependencies: " + ", ".join(missing))
        logic = AutoNNUNetLogic()
        workDir = Path(slicer.util.tempDirectory()) / "AutoNNUNetSelfTest"
        shutil.rmtree(workDir, ignore_errors=True)

        self.delayDisplay("Building a synthetic labeled scene")
        cases = []
        for index in range(6):  # nnU-Net's 5-fold split needs at least 5 cases
            image, truth = self._syntheticCase(index + 1)
            volume = self._addVolume(image, f"train{index}")
            # Alternate segment order: the class mapping must not depend on it.
            names = ["Sphere", "Box"] if index % 2 == 0 else ["Box", "Sphere"]
            cases.append(SceneCase(f"train{index}", self._addSegmentation(truth, volume, names), [volume]))
        colorTables = len(slicer.util.getNodesByClass("vtkMRMLColorTableNode"))

        self.delayDisplay("Exporting the dataset")
        datasetDir = logic.exportDataset(cases, ["Image"], None, workDir, 1, "SelfTest")
        datasetJson = json.loads((datasetDir / "dataset.json").read_text())
        self.assertEqual(datasetJson["labels"], {"background": 0, "Sphere": 1, "Box": 2})
        self.assertEqual(datasetJson["numTraining"], 6)
        # The export leaves no <segmentation>_ColorTable nodes behind.
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLColorTableNode")), colorTables)

        tick = slicer.app.processEvents
        self.delayDisplay("Fingerprint and plan")
        logic.startFingerprint(workDir)
        self.assertEqual(logic.board.wait("fingerprint", 1800, tick=tick).state, "succeeded")

        self.delayDisplay("Tiny search (quick profile)")
        logic.startSearch(workDir, parameters.search_settings(SEARCH_VALUES))
        search = logic.board.wait("search", 3600, tick=tick)
        self.assertEqual(search.state, "succeeded")
        self.assertGreaterEqual(search.progress.trials_finished, 1)  # the fold saw succeeded trials
        modelDir = logic.incumbentModelDir(search.context.search_root)
        self.assertIsNotNone(modelDir)

        self.delayDisplay("Segmenting an oblique test volume with the incumbent")
        image, truth = self._syntheticCase(99)
        testVolume = self._addVolume(image, "test", oblique=True)
        logic.startPrediction(modelDir, [testVolume], workDir, device="cpu", show3d=False)
        entry = logic.board.wait("predict", 1800, tick=tick)
        self.assertEqual(entry.state, "succeeded")
        segmentationNode = logic.loadPrediction(entry)
        self.assertTrue(segmentationNode.GetAttribute(scenelogic.PREDICTION_ATTRIBUTE))
        self.assertNotIn(segmentationNode, [s for s, _ in scenelogic.labeled_segmentations()])

        names = sorted(scenelogic.segment_names(segmentationNode))
        self.assertEqual(names, ["Box", "Sphere"])
        # The training segments' colors and terminology are the predicted segments' own.
        for look in scenelogic.segment_looks(segmentationNode):
            np.testing.assert_allclose(look.color, self.COLORS[look.name], atol=1e-6)
            self.assertEqual(look.terminology, self.TERMINOLOGY.get(look.name, ""))
        reference = vtk.vtkMatrix4x4()
        testVolume.GetIJKToRASMatrix(reference)
        referenceMatrix = slicer.util.arrayFromVTKMatrix(reference)
        segmentation = segmentationNode.GetSegmentation()
        for name, value in (("Sphere", 1), ("Box", 2)):
            segmentId = segmentation.GetSegmentIdBySegmentName(name)
            self._assertOnReferenceGrid(segmentationNode, segmentId, referenceMatrix)
            predicted = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, testVolume) > 0
            self.assertEqual(predicted.shape, truth.shape)
            expected = truth == value
            dice = 2.0 * np.logical_and(predicted, expected).sum() / max(1, predicted.sum() + expected.sum())
            self.delayDisplay(f"{name} Dice {dice:.3f}")
            self.assertGreater(dice, self.DICE_THRESHOLD, f"{name}: an axis flip or shift moves the box away")
        self.delayDisplay("Search and segment test passed")

    def _assertOnReferenceGrid(self, segmentationNode, segmentId, referenceMatrix) -> None:
        """The segment's own stored labelmap has the input's axes and spacing, and its voxels sit on
        the input's voxels (an integer offset: the stored extent may be cropped)."""
        import numpy as np

        labelmap = slicer.vtkOrientedImageData()
        segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId, labelmap)
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        own = slicer.util.arrayFromVTKMatrix(matrix)
        np.testing.assert_allclose(own[:3, :3], referenceMatrix[:3, :3], atol=1e-6)
        offset = np.linalg.solve(referenceMatrix, own @ np.array([0.0, 0.0, 0.0, 1.0]))[:3]
        np.testing.assert_allclose(offset, np.round(offset), atol=1e-4)
