"""AutoNNUNet: find the best nnU-Net for the labeled volumes in the Slicer scene.

A thin view over AutoNNUNetLib (the same library behind the ``autonnunet`` command and the remote
runner). The Widget only reads and fills widgets; the Logic turns scene nodes into the library's
records and starts the library's work; long work (fingerprinting, the search, segmentation) runs
in a child process of Slicer's Python (or on a remote runner) and is polled by a QTimer, so the
UI never blocks.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# From a source checkout (Additional module paths = <repo>/AutoNNUNet) the library sits one folder
# up; in an Extension Manager install it sits next to this file, which is already on sys.path.
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_MODULE_DIR, os.path.dirname(_MODULE_DIR)):
    if os.path.isfile(os.path.join(_candidate, "AutoNNUNetLib", "__init__.py")):
        if _candidate not in sys.path:
            sys.path.insert(0, _candidate)
        break

from AutoNNUNetLib import scene as autoscene  # noqa: E402  (pure Python + numpy, always importable)

#: Search spaces as shown -> as the library names them.
SEARCH_SPACES = {"HPO": "hpo", "HPO + NAS": "hpo_nas", "HPO + hierarchical NAS": "hpo_hnas"}
RUN_LOCAL = "This computer"
RUN_REMOTE = "Remote runner"
DEVICES = ["auto", "cuda", "mps", "cpu"]

#: Python packages the library needs besides what Slicer ships (numpy, SimpleITK) and torch (which
#: only the PyTorch extension installs). The ranges match the library's pyproject.toml.
PIP_REQUIREMENTS = [
    "nnunetv2>=2.8.1,<2.9",
    "neural-pipeline-search>=0.17,<0.18",
    "requests>=2.31,<3",
]
TORCH_REQUIREMENT = "torch>=2.1"
#: Packages pip must never replace (Slicer's own SimpleITK build, torch from PyTorchUtils).
PINNED_PACKAGES = ["torch", "SimpleITK", "numpy"]

#: Slicer settings keys. The runner URL and token live in the user's settings, never in the
#: scene, so a saved scene shared with a colleague does not carry the token.
SETTINGS_REMOTE_URL = "AutoNNUNet/RemoteURL"
SETTINGS_REMOTE_TOKEN = "AutoNNUNet/RemoteToken"

CHART_NAME = "AutoNNUNet trials"


#
# AutoNNUNet
#


class AutoNNUNet(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and Help section."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "AutoNNUNet"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["AutoNNUNet developers"]
        self.parent.helpText = """
Finds the best nnU-Net for your labeled volumes. Add the segmentations of the scene as training
cases, export them as an nnU-Net dataset, fingerprint it, then run a PriorBand search over nnU-Net
hyperparameters (and optionally architectures) on this computer or on a remote GPU runner.
Use the best model (or any point of the Dice / training time Pareto front) to segment new volumes.
"""
        self.parent.acknowledgementText = """
Built on nnU-Net (Isensee et al., Nature Methods 2021), NePS / PriorBand (Mallik et al., NeurIPS
2023) and the Auto-nnU-Net search spaces (Becktepe et al.).
"""


#
# Parameter node
#


@parameterNodeWrapper
class AutoNNUNetParameterNode:
    """Everything the module's settings hold; saved with the scene (except the runner token)."""

    workDir: Path = Path.home() / "AutoNNUNet"
    channelNames: str = "Image"
    datasetName: str = "AutoNNUNet"
    datasetId: Annotated[int, WithinRange(1, 999)] = 1
    searchSpace: Annotated[str, Choice(list(SEARCH_SPACES))] = "HPO"
    profile: Annotated[str, Choice(["default", "quick"])] = "default"
    totalEpochs: Annotated[int, WithinRange(0, 10000000)] = 2000
    wallTimeHours: Annotated[float, WithinRange(0.0, 10000.0)] = 0.0
    maxTrials: Annotated[int, WithinRange(0, 100000)] = 0
    minEpochs: Annotated[int, WithinRange(1, 10000)] = 10
    maxEpochs: Annotated[int, WithinRange(1, 10000)] = 1000
    folds: Annotated[str, Choice(["0", "all"])] = "0"
    iterationsPerEpoch: Annotated[int, WithinRange(0, 100000)] = 0  # 0 = the profile's own
    priorFirst: bool = False
    # 0 = plain PriorBand; the library's default 1 = Regularized PriorBand (faster trainings win ties).
    runtimeWeight: Annotated[float, WithinRange(0.0, 5.0)] = 1.0
    device: Annotated[str, Choice(DEVICES)] = "auto"
    runWhere: Annotated[str, Choice([RUN_LOCAL, RUN_REMOTE])] = RUN_LOCAL
    modelDir: Path = Path()
    mirroring: bool = False
    largestComponent: bool = False
    outputSegmentation: slicer.vtkMRMLSegmentationNode


#
# Records the Widget hands the Logic
#


@dataclass
class SceneCase:
    """One training case as picked in the cases table."""

    caseId: str
    segmentationNode: Any  # vtkMRMLSegmentationNode
    volumeNodes: list = field(default_factory=list)  # vtkMRMLScalarVolumeNode per channel, in order


@dataclass
class SearchSettings:
    """The search options of the Search section, in the library's terms."""

    space: str = "hpo"
    profile: str = "default"
    totalEpochs: int = 0  # 0 = no limit
    wallTimeSeconds: float = 0.0  # 0 = no limit
    maxTrials: int = 0  # 0 = no limit
    minEpochs: int = 10
    maxEpochs: int = 1000
    folds: str = "0"
    iterationsPerEpoch: int = 0  # 0 = the profile's own (250 default, 3 quick)
    priorFirst: bool = False  # train nnU-Net's default at full fidelity first, as the reference does
    runtimeWeight: float = 1.0
    device: str = "auto"

    def cliArguments(self, workDir: Path, root: Path) -> list:
        """Arguments of ``autonnunet search`` (CONTRACTS.md)."""
        args = ["--workdir", str(workDir), "--root", str(root), "--space", self.space, "--profile", self.profile,
                "--folds", self.folds, "--runtime-weight", repr(float(self.runtimeWeight)), "--device", self.device]
        if self.profile != "quick":  # the quick profile brings its own tiny epoch range
            args += ["--min-epochs", str(self.minEpochs), "--max-epochs", str(self.maxEpochs)]
        if self.totalEpochs > 0:
            args += ["--total-epochs", str(self.totalEpochs)]
        if self.wallTimeSeconds > 0:
            args += ["--wall-time", str(int(self.wallTimeSeconds))]
        if self.maxTrials > 0:
            args += ["--max-trials", str(self.maxTrials)]
        if self.iterationsPerEpoch > 0:
            args += ["--iterations-per-epoch", str(self.iterationsPerEpoch)]
        if self.priorFirst:
            args.append("--prior-first")
        return args

    def remoteOptions(self) -> dict:
        """The same options as keyword arguments of ``RemoteClient.submit_search`` (the runner
        picks its own devices, so there is no device here)."""
        options: dict = {"space": self.space, "profile": self.profile, "folds": "all" if self.folds == "all" else [int(self.folds)],
                         "runtime_weight": float(self.runtimeWeight)}
        if self.profile != "quick":
            options.update(min_epochs=self.minEpochs, max_epochs=self.maxEpochs)
        if self.totalEpochs > 0:
            options["total_epochs"] = self.totalEpochs
        if self.wallTimeSeconds > 0:
            options["wall_time"] = float(self.wallTimeSeconds)
        if self.maxTrials > 0:
            options["max_trials"] = self.maxTrials
        if self.iterationsPerEpoch > 0:
            options["iterations_per_epoch"] = self.iterationsPerEpoch
        return options


#
# AutoNNUNetWidget
#


class AutoNNUNetWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel. Reads widgets, calls the Logic, shows what comes back; no logic here."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[AutoNNUNetLogic] = None
        self._parameterNode: Optional[AutoNNUNetParameterNode] = None
        self._parameterNodeGuiTag = None
        self._classAliases: dict = {}
        self._updatingClassTable = False
        self._timer: Optional[qt.QTimer] = None
        self._shownTrials: list = []
        self._resultsRoot: Optional[Path] = None  # None: the local search folder

    # -- setup / teardown ------------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AutoNNUNet.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = AutoNNUNetLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Setup
        self.ui.installDependenciesButton.clicked.connect(self.onInstallDependencies)
        # Data
        self.ui.addAllLabeledButton.clicked.connect(self.onAddAllLabeled)
        self.ui.addCaseButton.clicked.connect(lambda: self._addCaseRow(None, []))
        self.ui.removeCaseButton.clicked.connect(self.onRemoveCases)
        self.ui.refreshClassesButton.clicked.connect(self.refreshClassTable)
        self.ui.classesTableWidget.itemChanged.connect(self.onClassItemChanged)
        self.ui.channelNamesLineEdit.editingFinished.connect(self._updateChannelColumns)
        self.ui.exportDatasetButton.clicked.connect(self.onExportDataset)
        # Fingerprint
        self.ui.runFingerprintButton.clicked.connect(self.onRunFingerprint)
        self.ui.showFingerprintButton.clicked.connect(self.onShowFingerprint)
        # Search
        self.ui.startButton.clicked.connect(lambda: self.onStartSearch(resume=False))
        self.ui.resumeButton.clicked.connect(lambda: self.onStartSearch(resume=True))
        self.ui.stopButton.clicked.connect(self.onStop)
        self.ui.testConnectionButton.clicked.connect(self.onTestConnection)
        self.ui.showChartButton.clicked.connect(self.onShowChart)
        self.ui.remoteUrlLineEdit.editingFinished.connect(self._saveRemoteSettings)
        self.ui.remoteTokenLineEdit.editingFinished.connect(self._saveRemoteSettings)
        self.ui.whereComboBox.currentIndexChanged.connect(self._updateRemoteWidgets)
        # Results
        self.ui.loadResultsButton.clicked.connect(self.onLoadResults)
        self.ui.paretoOnlyCheckBox.toggled.connect(lambda _checked: self._showTrials(self._shownTrials))
        self.ui.useIncumbentButton.clicked.connect(self.onUseIncumbent)
        self.ui.useSelectedTrialButton.clicked.connect(self.onUseSelectedTrial)
        self.ui.exportModelButton.clicked.connect(self.onExportModel)
        self.ui.importModelButton.clicked.connect(self.onImportModel)
        self.ui.modelPathLineEdit.currentPathChanged.connect(lambda _path: self._updateInferenceInputs())
        # Inference
        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.ui.cancelSegmentButton.clicked.connect(lambda: self.onCancel("predict"))

        settings = qt.QSettings()
        self.ui.remoteUrlLineEdit.text = str(settings.value(SETTINGS_REMOTE_URL, ""))
        self.ui.remoteTokenLineEdit.text = str(settings.value(SETTINGS_REMOTE_TOKEN, ""))

        # One timer polls every running job; it only runs while a job does.
        self._timer = qt.QTimer()
        self._timer.setInterval(1000)
        self._timer.timeout.connect(self.onPollJobs)

        self.initializeParameterNode()
        self._updateChannelColumns()
        self._updateInferenceInputs()
        self._updateRemoteWidgets()
        self._updateButtons()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            # Children are in their own process group and would outlive Slicer: stop them.
            self.logic.cancelAllJobs()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.ui.casesTableWidget.setRowCount(0)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: Optional[AutoNNUNetParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets carrying a SlicerParameterName property in the .ui follow the node both ways.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # -- helpers ---------------------------------------------------------------------------------

    def _workDir(self) -> Path:
        return Path(self._parameterNode.workDir).expanduser()

    def _channelNames(self) -> list:
        names = [n.strip() for n in self.ui.channelNamesLineEdit.text.split(",") if n.strip()]
        return names or ["Image"]

    def _appendLog(self, text: str) -> None:
        if text:
            self.ui.logTextEdit.appendPlainText(text.rstrip("\n"))

    def _updateButtons(self) -> None:
        busyWorkspace = self.logic.isRunning("search") or self.logic.isRunning("fingerprint")
        self.ui.startButton.enabled = not busyWorkspace
        self.ui.resumeButton.enabled = not busyWorkspace
        self.ui.stopButton.enabled = busyWorkspace
        self.ui.runFingerprintButton.enabled = not busyWorkspace
        self.ui.exportDatasetButton.enabled = not busyWorkspace
        self.ui.segmentButton.enabled = not self.logic.isRunning("predict")
        self.ui.cancelSegmentButton.enabled = self.logic.isRunning("predict")

    def _updateRemoteWidgets(self, *_args) -> None:
        remote = self.ui.whereComboBox.currentText == RUN_REMOTE
        for widget in (self.ui.remoteUrlLineEdit, self.ui.remoteTokenLineEdit, self.ui.testConnectionButton):
            widget.enabled = remote

    def _saveRemoteSettings(self) -> None:
        settings = qt.QSettings()
        settings.setValue(SETTINGS_REMOTE_URL, self.ui.remoteUrlLineEdit.text.strip())
        settings.setValue(SETTINGS_REMOTE_TOKEN, self.ui.remoteTokenLineEdit.text.strip())

    def _ensureDependencies(self) -> bool:
        """Check (and offer to install) what local work needs before the first real work."""
        if not self.logic.missingDependencies():
            return True
        self.onInstallDependencies()
        return not self.logic.missingDependencies()

    # -- Setup section ---------------------------------------------------------------------------

    def onInstallDependencies(self) -> None:
        missing = self.logic.missingDependencies()
        if not missing:
            self.ui.dependencyStatusLabel.text = "All dependencies installed: " + self.logic.dependencyVersionsText()
            return
        self.ui.dependencyStatusLabel.text = "Missing or incompatible: " + ", ".join(missing)
        question = (
            "AutoNNUNet needs these Python packages:\n\n  " + "\n  ".join(missing)
            + "\n\nPyTorch is installed through the PyTorch extension (matching your GPU); the rest with pip. "
            "This can take several minutes and a few GB of disk. Install now?"
        )
        if not slicer.util.confirmOkCancelDisplay(question, "AutoNNUNet dependencies"):
            return
        with slicer.util.tryWithErrorDisplay("Installing dependencies failed.", waitCursor=True):
            result = self.logic.installDependencies(log=lambda text: self._setDependencyStatus(text))
            self._setDependencyStatus(result.message)
            if result.needsRestart and slicer.util.confirmYesNoDisplay(
                result.message + "\n\nRestart Slicer now?", "AutoNNUNet dependencies"
            ):
                slicer.util.restart()

    def _setDependencyStatus(self, text: str) -> None:
        self.ui.dependencyStatusLabel.text = text
        slicer.app.processEvents()

    # -- Data section ----------------------------------------------------------------------------

    def _updateChannelColumns(self) -> None:
        """One volume column per channel name; existing picks are kept by position."""
        table = self.ui.casesTableWidget
        channels = self._channelNames()
        table.setColumnCount(2 + len(channels))
        table.setHorizontalHeaderLabels(["Case", "Segmentation"] + channels)
        for row in range(table.rowCount):
            for column in range(2, 2 + len(channels)):
                if table.cellWidget(row, column) is None:
                    table.setCellWidget(row, column, self._nodeSelector("vtkMRMLScalarVolumeNode", None))
        table.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)

    def _nodeSelector(self, nodeType: str, node) -> "slicer.qMRMLNodeComboBox":
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = [nodeType]
        selector.noneEnabled = True
        selector.addEnabled = False
        selector.removeEnabled = False
        selector.showChildNodeTypes = nodeType != "vtkMRMLScalarVolumeNode"  # no label maps as images
        selector.setMRMLScene(slicer.mrmlScene)
        selector.setCurrentNode(node)
        return selector

    def _addCaseRow(self, segmentationNode, volumeNodes: list) -> None:
        table = self.ui.casesTableWidget
        row = table.rowCount
        table.insertRow(row)
        taken = [table.item(r, 0).text() for r in range(row) if table.item(r, 0) is not None]
        name = segmentationNode.GetName() if segmentationNode is not None else f"case{row + 1}"
        table.setItem(row, 0, qt.QTableWidgetItem(autoscene.case_id_from_name(name, taken)))
        segmentationSelector = self._nodeSelector("vtkMRMLSegmentationNode", segmentationNode)
        segmentationSelector.currentNodeChanged.connect(lambda _node: self._onCaseSegmentationChanged(segmentationSelector))
        table.setCellWidget(row, 1, segmentationSelector)
        for index in range(len(self._channelNames())):
            node = volumeNodes[index] if index < len(volumeNodes) else None
            table.setCellWidget(row, 2 + index, self._nodeSelector("vtkMRMLScalarVolumeNode", node))

    def _onCaseSegmentationChanged(self, selector) -> None:
        """A newly picked segmentation brings its reference volume as the first channel."""
        table = self.ui.casesTableWidget
        for row in range(table.rowCount):
            if table.cellWidget(row, 1) == selector:  # rows shift on removal: find the selector's row now
                firstChannel = table.cellWidget(row, 2)
                reference = self.logic.referenceVolume(selector.currentNode()) if selector.currentNode() else None
                if firstChannel is not None and firstChannel.currentNode() is None and reference is not None:
                    firstChannel.setCurrentNode(reference)
        self.refreshClassTable()

    def _casesFromTable(self) -> list:
        table = self.ui.casesTableWidget
        cases = []
        for row in range(table.rowCount):
            caseId = table.item(row, 0).text().strip() if table.item(row, 0) else f"case{row + 1}"
            segmentation = table.cellWidget(row, 1).currentNode() if table.cellWidget(row, 1) else None
            volumes = [table.cellWidget(row, c).currentNode() if table.cellWidget(row, c) else None for c in range(2, table.columnCount)]
            cases.append(SceneCase(caseId, segmentation, volumes))
        return cases

    def onAddAllLabeled(self) -> None:
        present = {case.segmentationNode.GetID() for case in self._casesFromTable() if case.segmentationNode is not None}
        added = 0
        for segmentationNode, referenceVolume in self.logic.labeledVolumesInScene():
            if segmentationNode.GetID() in present:
                continue
            self._addCaseRow(segmentationNode, [referenceVolume] if referenceVolume is not None else [])
            added += 1
        self.ui.dataStatusLabel.text = f"Added {added} case(s)." if added else "No new segmentations with segments in the scene."
        self.refreshClassTable()

    def onRemoveCases(self) -> None:
        table = self.ui.casesTableWidget
        rows = sorted({index.row() for index in table.selectedIndexes()}, reverse=True)
        for row in rows:
            table.removeRow(row)
        self.refreshClassTable()

    def refreshClassTable(self) -> None:
        """Classes from the segment names of the listed cases (same name = same class)."""
        segmentNames = [self.logic.segmentNames(c.segmentationNode) for c in self._casesFromTable() if c.segmentationNode is not None]
        table = self.ui.classesTableWidget
        self._updatingClassTable = True
        try:
            try:
                rows = autoscene.class_rows(segmentNames, self._classAliases)
            except ValueError as error:
                self.ui.dataStatusLabel.text = str(error)
                rows = []
            table.setRowCount(len(rows))
            for index, classRow in enumerate(rows):
                cells = [classRow.segment_name, classRow.class_name, str(classRow.value), str(classRow.cases)]
                for column, text in enumerate(cells):
                    item = qt.QTableWidgetItem(text)
                    if column != 1:  # only the class name is editable
                        item.setFlags(item.flags() & ~qt.Qt.ItemIsEditable)
                    table.setItem(index, column, item)
        finally:
            self._updatingClassTable = False

    def onClassItemChanged(self, item) -> None:
        if self._updatingClassTable or item.column() != 1:
            return
        segmentName = self.ui.classesTableWidget.item(item.row(), 0).text()
        self._classAliases[segmentName] = item.text().strip() or segmentName
        self.refreshClassTable()

    def onExportDataset(self) -> None:
        # Export needs only numpy and SimpleITK, which Slicer ships: no dependency check here.
        cases = self._casesFromTable()
        progress = slicer.util.createProgressDialog(parent=slicer.util.mainWindow(), labelText="Exporting dataset...", maximum=100)

        def report(event) -> None:
            fraction = event.data.get("fraction")
            if fraction is not None:
                progress.value = int(100 * float(fraction))
            if event.data.get("message"):
                progress.labelText = str(event.data["message"])
            slicer.app.processEvents()

        try:
            folder = self.logic.exportDataset(
                cases, self._channelNames(), self._classAliases, self._workDir(),
                self._parameterNode.datasetId, self._parameterNode.datasetName, progress=report,
            )
        except Exception as error:  # DatasetError (a ValueError) names each case and its problem
            self.ui.dataStatusLabel.text = str(error)
            if not isinstance(error, ValueError):
                logging.exception("AutoNNUNet: dataset export failed")
            slicer.util.errorDisplay("The dataset was not exported:\n\n" + str(error), windowTitle="AutoNNUNet")
            return
        finally:
            progress.close()
        self.ui.dataStatusLabel.text = f"Dataset written to {folder}"

    # -- Fingerprint section ---------------------------------------------------------------------

    def onRunFingerprint(self) -> None:
        if not self._ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay("Could not start fingerprinting.", waitCursor=True):
            self.logic.startFingerprint(self._workDir())
            self.ui.fingerprintTextEdit.setPlainText("Fingerprinting and planning in the background...")
            self._appendLog("Fingerprint started.")
            self._startPolling()

    def onShowFingerprint(self) -> None:
        with slicer.util.tryWithErrorDisplay("No fingerprint to show.", waitCursor=True):
            self.ui.fingerprintTextEdit.setPlainText(self.logic.fingerprintSummary(self._workDir()))

    # -- Search section --------------------------------------------------------------------------

    def _searchSettings(self) -> SearchSettings:
        p = self._parameterNode
        return SearchSettings(
            space=SEARCH_SPACES[p.searchSpace], profile=p.profile, totalEpochs=p.totalEpochs,
            wallTimeSeconds=p.wallTimeHours * 3600.0, maxTrials=p.maxTrials, minEpochs=p.minEpochs,
            maxEpochs=p.maxEpochs, folds=p.folds, iterationsPerEpoch=p.iterationsPerEpoch, priorFirst=p.priorFirst,
            runtimeWeight=p.runtimeWeight, device=p.device,
        )

    def onStartSearch(self, resume: bool) -> None:
        remote = self._parameterNode.runWhere == RUN_REMOTE
        # A remote search needs only the client (requests) here; a local one everything.
        if remote and not self.logic.requirementSatisfied("requests"):
            slicer.util.errorDisplay("The 'requests' package is missing; use Setup > Check / install.")
            return
        if remote and resume:
            slicer.util.infoDisplay("A remote search resumes on its runner by itself (also after a runner restart); "
                                    "Start submits a new one.", windowTitle="AutoNNUNet")
            return
        if not remote and not self._ensureDependencies():
            return
        settings = self._searchSettings()
        with slicer.util.tryWithErrorDisplay("Could not start the search.", waitCursor=True):
            if remote:
                self._saveRemoteSettings()
                self.logic.startRemoteSearch(self._workDir(), settings, self.ui.remoteUrlLineEdit.text.strip(),
                                             self.ui.remoteTokenLineEdit.text.strip())
            else:
                root = self.logic.searchRoot(self._workDir())
                fresh = not resume
                if fresh and self.logic.hasSearch(self._workDir()):
                    # A new search must not silently mix with the trials of an old one.
                    if not slicer.util.confirmOkCancelDisplay(
                        f"{root} holds a previous search. Keep it (renamed) and start a new one?\n"
                        "(Use Resume to continue it instead.)", "AutoNNUNet"):
                        return
                self.logic.startSearch(self._workDir(), settings, resume=resume)
            self.ui.logTextEdit.clear()
            self._appendLog(("Resuming" if resume else "Starting") + " search...")
            self.ui.progressBar.value = 0
            self.ui.bestDiceLabel.text = "-"
            self._startPolling()

    def onTestConnection(self) -> None:
        self._saveRemoteSettings()
        with slicer.util.tryWithErrorDisplay("The runner did not answer.", waitCursor=True):
            message = self.logic.testRemote(self.ui.remoteUrlLineEdit.text.strip(), self.ui.remoteTokenLineEdit.text.strip())
            slicer.util.infoDisplay(message, windowTitle="AutoNNUNet runner")

    def onStop(self) -> None:
        """Stop whatever runs on the working folder (the search or the fingerprinting)."""
        for kind in ("search", "fingerprint"):
            if self.logic.isRunning(kind):
                self.onCancel(kind)

    def onCancel(self, kind: str) -> None:
        self.logic.cancelJob(kind)
        self._appendLog(f"Cancelling {kind}...")

    def onShowChart(self) -> None:
        self.logic.showChart()

    def _startPolling(self) -> None:
        self._updateButtons()
        if not self._timer.isActive():
            self._timer.start()

    def onPollJobs(self) -> None:
        """QTimer slot: fold new events and log text of every job into the UI."""
        for kind, job, update in self.logic.pollJobs():
            self._appendLog(update.log)
            for event in update.events:
                line = autoscene.format_event(event)
                if line and event.kind != "epoch":  # epoch lines go to the status label, not the log
                    self._appendLog(line)
            state = job.state
            if kind == "search":
                self.ui.statusLabel.text = state.status_text()
                self.ui.progressBar.value = state.percent()
                self.ui.bestDiceLabel.text = state.best_text()
                if any(e.kind == "trial_finished" for e in update.events):
                    self.logic.updateChart(state.finished_points())
            elif kind == "predict":
                self.ui.inferenceStatusLabel.text = state.status_text()
            if update.finished:
                self._onJobFinished(kind, job, update)
        if not self.logic.anyRunning():
            self._timer.stop()
        self._updateButtons()

    def _onJobFinished(self, kind: str, job, update) -> None:
        self._appendLog(f"{kind} {update.state}" + (f": {update.message}" if update.message else ""))
        if kind == "search" and update.state == "stopped":
            # Stopped by its wall time: the trials so far are results; Resume continues.
            self.ui.statusLabel.text = "Search stopped (wall time); Resume continues it."
            self.onLoadResults()
            self.onUseIncumbent()
            return
        if update.state != "succeeded":
            if kind == "predict":
                self.ui.inferenceStatusLabel.text = f"Segmentation {update.state}. {update.message}"
            elif kind == "search":
                self.ui.statusLabel.text = f"Search {update.state}" + ("; use Resume to continue." if update.state == "cancelled" else ".")
            if update.state == "failed":
                slicer.util.errorDisplay(f"{kind} failed: {update.message}\n\nSee the log for details.", windowTitle="AutoNNUNet")
            return
        with slicer.util.tryWithErrorDisplay(f"Could not load the {kind} result.", waitCursor=True):
            if kind == "fingerprint":
                self.ui.fingerprintTextEdit.setPlainText(self.logic.fingerprintSummary(self._workDir()))
            elif kind == "search":
                self.ui.statusLabel.text = "Search finished."
                self.ui.progressBar.value = 100
                remoteModel = self.logic.collectRemoteResult(job)
                if remoteModel is not None:
                    self._resultsRoot = job.download_dir  # the runner's results.json, if it sent one
                    self._showTrials(self.logic.trialRows(self._workDir(), self._resultsRoot))
                    self._parameterNode.modelDir = remoteModel
                else:
                    self.onLoadResults()
                    self.onUseIncumbent()
            elif kind == "predict":
                segmentationNode = self.logic.loadPrediction(job, self._parameterNode.outputSegmentation)
                self._parameterNode.outputSegmentation = segmentationNode
                self.ui.inferenceStatusLabel.text = f"Segmented into '{segmentationNode.GetName()}'."

    # -- Results section -------------------------------------------------------------------------

    def onLoadResults(self) -> None:
        self._resultsRoot = None
        rows = self.logic.trialRows(self._workDir())
        self._showTrials(rows)
        if not rows:
            self._appendLog(f"No results.json in {self.logic.searchRoot(self._workDir())} yet.")

    def _showTrials(self, rows: list) -> None:
        self._shownTrials = rows
        table = self.ui.trialsTableWidget
        visible = [r for r in rows if r.pareto or not self.ui.paretoOnlyCheckBox.checked]
        table.setRowCount(len(visible))
        for index, row in enumerate(visible):
            cells = [
                row.trial,
                "" if row.epochs is None else str(row.epochs),
                "" if row.dice is None else f"{row.dice:.4f}",
                autoscene.format_duration(row.train_seconds),
                "yes" if row.pareto else "",
                "yes" if row.incumbent else "",
                json.dumps(row.config, sort_keys=True),
            ]
            for column, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(text if column == 6 else (str(row.model_dir) if row.model_dir else "no model folder kept"))
                table.setItem(index, column, item)
        if visible:
            self.logic.updateChart(
                [autoscene.TrialPoint(trial=r.trial, epochs=r.epochs, dice=r.dice, train_seconds=r.train_seconds, state="succeeded")
                 for r in rows if r.dice is not None and r.train_seconds is not None and r.state == "succeeded"]
            )

    def onUseIncumbent(self) -> None:
        modelDir = self.logic.incumbentModelDir(self._workDir())
        if modelDir is None:
            slicer.util.warningDisplay("The search has no incumbent model yet.", windowTitle="AutoNNUNet")
            return
        self._parameterNode.modelDir = modelDir

    def onUseSelectedTrial(self) -> None:
        table = self.ui.trialsTableWidget
        selected = sorted({index.row() for index in table.selectedIndexes()})
        if not selected:
            slicer.util.warningDisplay("Select a trial in the table first.", windowTitle="AutoNNUNet")
            return
        trial = table.item(selected[0], 0).text()
        row = next((r for r in self._shownTrials if r.trial == trial), None)
        if row is None or row.model_dir is None or not Path(row.model_dir).exists():
            slicer.util.warningDisplay(f"Trial {trial} kept no model folder.", windowTitle="AutoNNUNet")
            return
        self._parameterNode.modelDir = Path(row.model_dir)

    def onExportModel(self) -> None:
        modelDir = Path(self._parameterNode.modelDir)
        path = qt.QFileDialog.getSaveFileName(None, "Export model", str(self._workDir() / f"{modelDir.name}.zip"), "Zip (*.zip)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Model export failed.", waitCursor=True):
            written = self.logic.exportModel(modelDir, Path(path))
            slicer.util.infoDisplay(f"Model written to {written}", windowTitle="AutoNNUNet")

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(None, "Import model", str(self._workDir()), "Zip (*.zip)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Model import failed.", waitCursor=True):
            self._parameterNode.modelDir = self.logic.importModel(Path(path), self._workDir())

    # -- Inference section -----------------------------------------------------------------------

    def _updateInferenceInputs(self) -> None:
        """One input row per channel of the current model (one row when no model is chosen)."""
        table = self.ui.inferenceInputsTableWidget
        # Read the path from the widget: this runs from its own signal, maybe before the node follows.
        channels = self.logic.modelChannelNames(Path(self.ui.modelPathLineEdit.currentPath)) if self.ui.modelPathLineEdit.currentPath else []
        channels = channels or ["Image"]
        previous = [table.cellWidget(r, 1).currentNode() if table.cellWidget(r, 1) else None for r in range(table.rowCount)]
        table.setRowCount(len(channels))
        for row, name in enumerate(channels):
            item = qt.QTableWidgetItem(name)
            item.setFlags(item.flags() & ~qt.Qt.ItemIsEditable)
            table.setItem(row, 0, item)
            selector = self._nodeSelector("vtkMRMLScalarVolumeNode", previous[row] if row < len(previous) else None)
            table.setCellWidget(row, 1, selector)
        table.horizontalHeader().setSectionResizeMode(1, qt.QHeaderView.Stretch)

    def onSegment(self) -> None:
        if not self._ensureDependencies():
            return
        table = self.ui.inferenceInputsTableWidget
        volumes = [table.cellWidget(r, 1).currentNode() for r in range(table.rowCount)]
        if any(v is None for v in volumes):
            slicer.util.warningDisplay("Pick an input volume for every channel.", windowTitle="AutoNNUNet")
            return
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            self.logic.startPrediction(
                Path(self._parameterNode.modelDir), volumes, self._workDir(), device=self._parameterNode.device,
                mirroring=self._parameterNode.mirroring, largestComponent=self._parameterNode.largestComponent,
            )
            self.ui.inferenceStatusLabel.text = "Segmenting in the background..."
            self._startPolling()


#
# AutoNNUNetLogic
#


@dataclass
class DependencyResult:
    installed: list
    needsRestart: bool
    message: str


class AutoNNUNetLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, without widgets, so the self-test and the Python console use it too.

    Scene nodes are turned into AutoNNUNetLib records here; the library does the work.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.jobs: dict = {}  # kind -> ProcessJob / RemoteSearchJob (fingerprint, search, predict)

    def getParameterNode(self) -> AutoNNUNetParameterNode:
        return AutoNNUNetParameterNode(super().getParameterNode())

    # -- dependencies ----------------------------------------------------------------------------

    @staticmethod
    def requirementSatisfied(requirement: str) -> bool:
        try:
            from packaging.requirements import Requirement
        except ImportError:  # no packaging: presence is all we can check
            name = requirement.split(">")[0].split("<")[0].split("=")[0].strip()
            try:
                importlib.metadata.version(name)
                return True
            except importlib.metadata.PackageNotFoundError:
                return False
        parsed = Requirement(requirement)
        try:
            installed = importlib.metadata.version(parsed.name)
        except importlib.metadata.PackageNotFoundError:
            return False
        return parsed.specifier.contains(installed, prereleases=True)

    def missingDependencies(self) -> list:
        """Requirements not installed or installed at an incompatible version."""
        return [r for r in [TORCH_REQUIREMENT, *PIP_REQUIREMENTS] if not self.requirementSatisfied(r)]

    @staticmethod
    def dependencyVersionsText() -> str:
        versions = []
        for name in ("torch", "nnunetv2", "neural-pipeline-search"):
            try:
                versions.append(f"{name} {importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                versions.append(f"{name} missing")
        return ", ".join(versions)

    def installDependencies(self, log: Callable[[str], None] = logging.info) -> DependencyResult:
        """torch through the PyTorch extension, the rest with pip; torch and SimpleITK stay pinned.

        Returns whether Slicer must restart (the PyTorch extension was just installed, or a
        package Slicer had already imported changed version).
        """
        installed: list = []
        try:
            import PyTorchUtils  # noqa: F401  (provided by the PyTorch extension)
        except ImportError:
            manager = slicer.app.extensionsManagerModel()
            log("Installing the PyTorch extension...")
            if not manager.isExtensionInstalled("PyTorch") and not manager.installExtensionFromServer("PyTorch"):
                raise RuntimeError("Could not install the PyTorch extension; install it from the Extensions Manager.")
            return DependencyResult(["PyTorch extension"], True,
                                    "The PyTorch extension was installed. Restart Slicer, then click 'Check / install' again.")

        if not self.requirementSatisfied(TORCH_REQUIREMENT):
            log("Installing PyTorch (this can take several minutes)...")
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT.replace("torch", "", 1)) is None:
                raise RuntimeError("PyTorch installation failed (see the Python console).")
            installed.append("torch")

        before = self._versions(["numpy", "SimpleITK", "requests", "packaging"])
        # A constraints file pins what pip must not touch: torch stays the PyTorchUtils build (the
        # right CUDA variant), SimpleITK stays Slicer's own build.
        pins = [f"{name}=={version}" for name, version in self._versions(PINNED_PACKAGES).items() if version]
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
            constraints.write("\n".join(pins) + "\n")
        try:
            toInstall = [r for r in PIP_REQUIREMENTS if not self.requirementSatisfied(r)]
            if toInstall:
                log("Installing " + ", ".join(toInstall) + " ...")
                slicer.util.pip_install([*toInstall, "--constraint", constraints.name])
                installed += toInstall
        finally:
            os.unlink(constraints.name)
        importlib.invalidate_caches()
        still = self.missingDependencies()
        if still:
            raise RuntimeError("Still missing after installation: " + ", ".join(still))
        changed = [name for name, version in self._versions(list(before)).items() if version != before[name] and name in sys.modules]
        if changed:
            return DependencyResult(installed, True, "Installed. Updated packages Slicer already uses (" + ", ".join(changed)
                                    + "): restart Slicer before continuing.")
        return DependencyResult(installed, False, "Dependencies installed: " + self.dependencyVersionsText())

    @staticmethod
    def _versions(names: list) -> dict:
        versions = {}
        for name in names:
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                versions[name] = None
        return versions

    # -- scene -> cases --------------------------------------------------------------------------

    @staticmethod
    def referenceVolume(segmentationNode):
        """The volume a segmentation was drawn on (its reference image geometry), if in the scene."""
        if segmentationNode is None:
            return None
        node = segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole())
        return node if node is not None and node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode") else None

    def labeledVolumesInScene(self) -> list:
        """(segmentation, reference volume or None) for every segmentation with at least one segment."""
        found = []
        for segmentationNode in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
            if segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
                continue
            found.append((segmentationNode, self.referenceVolume(segmentationNode)))
        return found

    @staticmethod
    def segmentIds(segmentationNode) -> list:
        segmentation = segmentationNode.GetSegmentation()
        return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]

    def segmentNames(self, segmentationNode) -> list:
        segmentation = segmentationNode.GetSegmentation()
        return [segmentation.GetSegment(segmentId).GetName() for segmentId in self.segmentIds(segmentationNode)]

    @staticmethod
    def volumeGeometry(volumeNode):
        """The node's grid as a dataset.Geometry (LPS), exactly: spacing/origin/directions as stored."""
        directions = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASDirectionMatrix(directions)
        directionsRAS = slicer.util.arrayFromVTKMatrix(directions)[:3, :3]
        return autoscene.geometry_from_ras(volumeNode.GetSpacing(), volumeNode.GetOrigin(), directionsRAS)

    def volumeFromNode(self, volumeNode):
        """A dataset.Volume: the voxels (KJI = SimpleITK's z, y, x order, copied) and LPS geometry."""
        from AutoNNUNetLib.dataset import Volume

        return Volume(array=slicer.util.arrayFromVolume(volumeNode).copy(), geometry=self.volumeGeometry(volumeNode))

    def exportLabelArray(self, segmentationNode, referenceVolume):
        """The segmentation as a label array on ``referenceVolume``'s grid, value = segment position + 1."""
        segmentIds = vtk.vtkStringArray()
        for segmentId in self.segmentIds(segmentationNode):
            segmentIds.InsertNextValue(segmentId)
        labelmapNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "AutoNNUNet export")
        try:
            # An explicit segment list (and no color table) fixes the values to list positions.
            if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
                segmentationNode, segmentIds, labelmapNode, referenceVolume
            ):
                raise ValueError(f"exporting segmentation '{segmentationNode.GetName()}' to a label map failed")
            return slicer.util.arrayFromVolume(labelmapNode).copy()
        finally:
            slicer.mrmlScene.RemoveNode(labelmapNode)

    def checkCases(self, cases: list, nChannels: int) -> list:
        """``(case id, problem)`` for what the library cannot see: missing nodes, transforms."""
        problems = []
        ids = [c.caseId for c in cases]
        for case in cases:
            if ids.count(case.caseId) > 1:
                problems.append((case.caseId, "case name used twice"))
            if case.segmentationNode is None:
                problems.append((case.caseId, "no segmentation selected"))
            elif case.segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
                problems.append((case.caseId, f"segmentation '{case.segmentationNode.GetName()}' has no segments"))
            volumes = list(case.volumeNodes)[:nChannels]
            if len(volumes) < nChannels or any(v is None for v in volumes):
                problems.append((case.caseId, f"pick a volume for each of the {nChannels} channel(s)"))
            for node in [case.segmentationNode, *volumes]:
                if node is not None and node.GetParentTransformNode() is not None:
                    # Files store a grid, not a transform: harden it so what is exported is what is seen.
                    problems.append((case.caseId, f"'{node.GetName()}' is under a transform; harden the transform first"))
            for volume in volumes:
                if volume is not None and volume.GetImageData() is not None and volume.GetImageData().GetNumberOfScalarComponents() != 1:
                    problems.append((case.caseId, f"'{volume.GetName()}' is not a scalar volume (split its components into channels)"))
        if not cases:
            problems.append((None, "no cases: add labeled volumes first"))
        return problems

    def buildSource(self, cases: list, channelNames: list, aliases: Optional[dict] = None):
        """A dataset.DatasetSource from scene cases; raises DatasetError listing every problem."""
        from AutoNNUNetLib.dataset import Case, DatasetError, DatasetSource, Problem

        problems = self.checkCases(cases, len(channelNames))
        if problems:
            raise DatasetError([Problem(caseId, message) for caseId, message in problems])
        namesPerCase = [self.segmentNames(c.segmentationNode) for c in cases]
        classes = autoscene.class_table_from_segment_names(namesPerCase, aliases)
        libraryCases = []
        for case, names in zip(cases, namesPerCase):
            volumes = list(case.volumeNodes)[: len(channelNames)]
            label = self.exportLabelArray(case.segmentationNode, volumes[0])
            libraryCases.append(Case(
                case_id=case.caseId,
                channels=[self.volumeFromNode(v) for v in volumes],
                label=self._labelVolume(label, volumes[0]),
                label_names=autoscene.case_label_names(names, aliases),
            ))
        return DatasetSource(cases=libraryCases, classes=classes, channel_names=list(channelNames))

    def _labelVolume(self, array, referenceVolume):
        from AutoNNUNetLib.dataset import Volume

        return Volume(array=array, geometry=self.volumeGeometry(referenceVolume))

    def exportDataset(self, cases: list, channelNames: list, aliases: Optional[dict], workDir: Path,
                      datasetId: int = 1, datasetName: str = "AutoNNUNet", progress=None) -> Path:
        """Scene cases -> nnU-Net raw dataset in ``workDir`` (replaces the same id/name)."""
        from AutoNNUNetLib.dataset import build_dataset
        from AutoNNUNetLib.workspace import Workspace

        from AutoNNUNetLib.workspace import dataset_folder_name

        target = dataset_folder_name(int(datasetId), datasetName)
        others = sorted(p.name for p in (Path(workDir) / "nnUNet_raw").glob("Dataset*") if p.is_dir() and p.name != target)
        if others:
            # Fingerprint and search find the dataset on their own only when it is the only one.
            raise ValueError(f"the working folder already holds {', '.join(others)}; choose a new working folder, "
                             "or the same dataset ID and name to replace it")
        source = self.buildSource(cases, channelNames, aliases)
        workDir.mkdir(parents=True, exist_ok=True)
        return Path(build_dataset(source, Workspace(workDir), dataset_id=int(datasetId), name=datasetName,
                                  overwrite=True, progress=progress))

    # -- background jobs -------------------------------------------------------------------------

    @staticmethod
    def pythonExecutable() -> str:
        """PythonSlicer (Slicer's Python with its library paths set up), else this interpreter."""
        return shutil.which("PythonSlicer") or sys.executable

    @staticmethod
    def childEnvironment() -> dict:
        """A copy of Slicer's environment for the child; Slicer's own os.environ is never changed."""
        return autoscene.subprocess_environment(os.environ, autoscene.library_parent())

    def _startProcessJob(self, kind: str, verb: str, arguments: list, workDir: Path, output: Any = None,
                         stoppedExitCodes: tuple = ()):
        if self.isRunning(kind):
            raise RuntimeError(f"a {kind} job is already running")
        jobsDir = Path(workDir) / "jobs"
        jobsDir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        eventsFile = jobsDir / f"{kind}-{stamp}.events.jsonl"
        options = autoscene.verb_options(verb)
        if not options:
            raise RuntimeError(f"this AutoNNUNetLib has no '{verb}' command")
        useEvents = "--events" in options
        if "--quiet" in options:
            arguments = [*arguments, "--quiet"]  # no terminal progress bar in the log file: events carry progress
        command = autoscene.autonnunet_command(self.pythonExecutable(), verb, arguments, eventsFile if useEvents else None)
        process = autoscene.BackgroundProcess(command, self.childEnvironment(), jobsDir / f"{kind}-{stamp}.log", cwd=str(workDir))
        logging.info("AutoNNUNet: starting %s", " ".join(command))
        job = autoscene.ProcessJob(kind, process, eventsFile if useEvents else None, output=output,
                                   stopped_exit_codes=stoppedExitCodes).start()
        self.jobs[kind] = job
        return job

    def isRunning(self, kind: str) -> bool:
        job = self.jobs.get(kind)
        return job is not None and job.running

    def anyRunning(self) -> bool:
        return any(job.running for job in self.jobs.values())

    def pollJobs(self) -> list:
        """``(kind, job, JobUpdate)`` for every job that was running; never blocks."""
        updates = []
        for kind, job in list(self.jobs.items()):
            if job.running:
                updates.append((kind, job, job.poll()))
        return updates

    def cancelJob(self, kind: str) -> None:
        job = self.jobs.get(kind)
        if job is not None and job.running:
            job.cancel()

    def cancelAllJobs(self) -> None:
        """Stop every job before Slicer exits: local trees are killed (blocking, a few seconds at
        most), remote jobs are left running on their runner."""
        for job in self.jobs.values():
            if job.running and isinstance(job, autoscene.ProcessJob):
                job.terminate()

    def waitForJob(self, kind: str, timeoutSeconds: float):
        """Poll a job until it ends, keeping Slicer responsive (self-test, scripting)."""
        job = self.jobs[kind]
        deadline = time.monotonic() + timeoutSeconds
        last = autoscene.JobUpdate()
        while job.running:
            update = job.poll()
            if update.log:
                logging.info(update.log.rstrip())
            if update.finished:
                last = update
                break
            if time.monotonic() > deadline:
                job.cancel()
                raise TimeoutError(f"{kind} did not finish within {timeoutSeconds:.0f} s")
            slicer.app.processEvents()
            time.sleep(0.5)
        return last

    # -- fingerprint -----------------------------------------------------------------------------

    def startFingerprint(self, workDir: Path):
        return self._startProcessJob("fingerprint", "fingerprint", ["--workdir", str(workDir)], workDir)

    def fingerprintSummary(self, workDir: Path) -> str:
        from AutoNNUNetLib.fingerprint import summarize
        from AutoNNUNetLib.workspace import Workspace

        return summarize(Workspace(workDir)).to_text()

    # -- search ----------------------------------------------------------------------------------

    @staticmethod
    def searchRoot(workDir: Path) -> Path:
        return Path(workDir) / "search"

    def hasSearch(self, workDir: Path) -> bool:
        root = self.searchRoot(workDir)
        return root.exists() and any(root.iterdir())

    def startSearch(self, workDir: Path, settings: SearchSettings, resume: bool = False):
        """A local search in a child process; ``resume`` continues the existing search folder."""
        root = self.searchRoot(workDir)
        if not resume and self.hasSearch(workDir):
            root.rename(root.with_name(f"search-{time.strftime('%Y%m%d-%H%M%S')}"))
        # Exit code 3: the search stopped early (wall time); its folder resumes with Resume.
        return self._startProcessJob("search", "search", settings.cliArguments(workDir, root), workDir, stoppedExitCodes=(3,))

    @staticmethod
    def remoteClient(url: str, token: str):
        from AutoNNUNetLib.client import RemoteClient

        if not url:
            raise ValueError("enter the runner's URL")
        return RemoteClient(url, token)

    def testRemote(self, url: str, token: str) -> str:
        client = self.remoteClient(url, token)
        health = client.health()  # no token needed: tells whether the server is up
        user = client.whoami()  # needs the token: tells whether it is accepted
        return f"Connected as '{user}'. Runner: {json.dumps(health, sort_keys=True)}"

    def startRemoteSearch(self, workDir: Path, settings: SearchSettings, url: str, token: str):
        """Upload the exported dataset and start the search on a runner (all network off the UI thread)."""
        from AutoNNUNetLib.workspace import Workspace

        if self.isRunning("search"):
            raise RuntimeError("a search is already running")
        datasetDir = Workspace(workDir).raw_dataset  # raises when no dataset was exported
        options = settings.remoteOptions()
        downloadDir = Path(workDir) / "remote" / time.strftime("%Y%m%d-%H%M%S")
        downloadDir.mkdir(parents=True, exist_ok=True)
        job = autoscene.RemoteSearchJob(self.remoteClient(url, token), datasetDir, options, downloadDir)
        self.jobs["search"] = job
        return job

    def collectRemoteResult(self, job) -> Optional[Path]:
        """The model folder of a finished remote search: its downloaded zip, unpacked and checked."""
        if not isinstance(job, autoscene.RemoteSearchJob) or job.output is None:
            return None
        from AutoNNUNetLib.model import import_model

        return Path(import_model(Path(job.output), job.download_dir / "model"))

    # -- results ---------------------------------------------------------------------------------

    def trialRows(self, workDir: Path, root: Optional[Path] = None) -> list:
        """Rows of the trials table from ``results.json`` (the local search's unless ``root`` is given)."""
        root = Path(root) if root is not None else self.searchRoot(workDir)
        return autoscene.trial_rows_from_results(autoscene.load_results(root), root)

    def incumbentModelDir(self, workDir: Path) -> Optional[Path]:
        root = self.searchRoot(workDir)
        return autoscene.incumbent_model_dir(root, autoscene.load_results(root))

    @staticmethod
    def exportModel(modelDir: Path, zipPath: Path) -> Path:
        from AutoNNUNetLib.model import export_model

        return Path(export_model(modelDir, zipPath))

    @staticmethod
    def importModel(zipPath: Path, workDir: Path) -> Path:
        from AutoNNUNetLib.model import import_model

        dest = Path(workDir) / "models" / zipPath.stem
        dest.mkdir(parents=True, exist_ok=True)
        return Path(import_model(zipPath, dest, overwrite=True))  # importing the same zip again replaces it

    # -- chart -----------------------------------------------------------------------------------

    def _chartNodes(self):
        """The trials table/series/chart nodes, created once per scene and reused."""
        scene = slicer.mrmlScene
        chart = scene.GetFirstNodeByName(CHART_NAME)
        if chart is not None and chart.IsA("vtkMRMLPlotChartNode"):
            return chart, chart.GetNthPlotSeriesNode(0), chart.GetNthPlotSeriesNode(1)
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", CHART_NAME)
        chart.SetTitle("AutoNNUNet search: Dice vs training time")
        chart.SetXAxisTitle("Training time (min)")
        chart.SetYAxisTitle("Validation Dice")
        chart.SetLegendVisibility(True)
        seriesNodes = []
        for name, plotType, color in (
            ("Trials", slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter, (0.18, 0.55, 0.85)),
            ("Pareto front", slicer.vtkMRMLPlotSeriesNode.PlotTypeLine, (0.9, 0.3, 0.24)),
        ):
            table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{CHART_NAME} {name}")
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName("minutes")
            series.SetYColumnName("dice")
            series.SetPlotType(plotType)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
            series.SetMarkerSize(8)
            series.SetColor(*color)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
            seriesNodes.append(series)
        return chart, seriesNodes[0], seriesNodes[1]

    def updateChart(self, points: list):
        """All finished trials and their Pareto front (Dice up, training time down)."""
        import numpy as np

        if not points:
            return None
        chart, trialsSeries, frontSeries = self._chartNodes()
        minutes = np.array([p.train_seconds / 60.0 for p in points], dtype=float)
        dice = np.array([p.dice for p in points], dtype=float)
        front = autoscene.pareto_front(list(zip(minutes, dice)))
        slicer.util.updateTableFromArray(trialsSeries.GetTableNode(), [minutes, dice], ["minutes", "dice"])
        slicer.util.updateTableFromArray(frontSeries.GetTableNode(), [minutes[front], dice[front]], ["minutes", "dice"])
        return chart

    def showChart(self) -> None:
        chart, _, _ = self._chartNodes()
        # Switches to a layout with a plot view if the current one has none.
        slicer.modules.plots.logic().ShowChartInLayout(chart)

    # -- inference -------------------------------------------------------------------------------

    @staticmethod
    def _modelDatasetJson(modelDir: Optional[Path]) -> dict:
        if not modelDir or Path(modelDir) == Path():  # Path() is the parameter node's "not set"
            return {}
        path = Path(modelDir) / "dataset.json"
        if not path.is_file():
            return {}
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)

    def modelChannelNames(self, modelDir: Path) -> list:
        names = self._modelDatasetJson(modelDir).get("channel_names") or {}
        return [str(names[key]) for key in sorted(names, key=lambda k: int(k))]

    def modelClasses(self, modelDir: Path) -> dict:
        """``{class name: value}`` from the model's dataset.json (nnU-Net v2 ``labels``)."""
        labels = self._modelDatasetJson(modelDir).get("labels") or {}
        classes = {}
        for name, value in labels.items():
            if isinstance(value, (list, tuple)):  # region-based labels: not a plain label map
                raise ValueError(f"the model uses region-based labels ({name}); only label maps are supported")
            classes[str(name)] = int(value)
        return classes

    def startPrediction(self, modelDir: Path, volumeNodes: list, workDir: Path, device: str = "auto",
                        mirroring: bool = False, largestComponent: bool = False):
        """Write the input channels (exact geometry) and segment them in a child process."""
        modelDir = Path(modelDir)
        if not (modelDir / "plans.json").is_file():
            raise ValueError(f"{modelDir} is not an nnU-Net model folder (no plans.json)")
        expected = self.modelChannelNames(modelDir)
        if expected and len(expected) != len(volumeNodes):
            raise ValueError(f"the model expects {len(expected)} channel(s) ({', '.join(expected)}), got {len(volumeNodes)}")
        folder = Path(workDir) / "predictions" / time.strftime("%Y%m%d-%H%M%S")
        inputs = []
        for index, volumeNode in enumerate(volumeNodes):
            if volumeNode.GetParentTransformNode() is not None:
                raise ValueError(f"'{volumeNode.GetName()}' is under a transform; harden the transform first")
            inputs.append(self.volumeFromNode(volumeNode).write(folder / f"input_{index:04d}.nii.gz"))
        output = folder / "prediction.nii.gz"
        arguments = ["--model", str(modelDir), "-i", *[str(p) for p in inputs], "-o", str(output), "--device", device]
        if mirroring:
            arguments.append("--mirroring")
        if largestComponent:
            arguments.append("--largest-component")
        result = {"output": output, "referenceVolumeID": volumeNodes[0].GetID(), "modelDir": modelDir}
        return self._startProcessJob("predict", "predict", arguments, workDir, output=result)

    def loadPrediction(self, job, segmentationNode=None):
        """The finished prediction as named, colored segments on the first input's geometry."""
        output = job.output
        referenceVolume = slicer.mrmlScene.GetNodeByID(output["referenceVolumeID"])
        return self.loadLabelFile(output["output"], referenceVolume, self.modelClasses(output["modelDir"]), segmentationNode)

    def loadLabelFile(self, path: Path, referenceVolume, classes: dict, segmentationNode=None):
        from AutoNNUNetLib.dataset import Volume

        prediction = Volume.read(path)
        expected = self.volumeGeometry(referenceVolume)
        if not prediction.geometry.close_to(expected):
            raise ValueError(f"the prediction's grid differs from '{referenceVolume.GetName()}': "
                             + "; ".join(prediction.geometry.differences(expected)))
        return self.segmentationFromLabelArray(prediction.array, referenceVolume, classes, segmentationNode)

    def segmentationFromLabelArray(self, labelArray, referenceVolume, classes: dict, segmentationNode=None):
        """A segmentation node with one segment per class present in the table, on the reference grid."""
        if segmentationNode is None:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{referenceVolume.GetName()} AutoNNUNet")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        segmentation = segmentationNode.GetSegmentation()
        segmentation.RemoveAllSegments()  # the node shows this prediction only
        colors = autoscene.class_colors(classes)
        for name, value in sorted(classes.items(), key=lambda item: item[1]):
            if value == 0:
                continue
            segmentId = segmentation.AddEmptySegment("", name)  # Slicer picks a unique id
            segmentation.GetSegment(segmentId).SetColor(*colors[name])
            mask = (labelArray == value).astype("uint8")
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentationNode, segmentId, referenceVolume)
        # Show in 2D (over its volume) and in 3D.
        segmentationNode.CreateClosedSurfaceRepresentation()
        segmentationNode.SetDisplayVisibility(True)
        slicer.util.setSliceViewerLayers(background=referenceVolume)
        return segmentationNode


#
# AutoNNUNetTest
#


class AutoNNUNetTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: synthetic labeled scene -> dataset -> tiny search -> segmentation.

    Needs the dependencies installed (it installs nothing) and takes several minutes on a CPU.
    """

    SHAPE = (24, 28, 32)  # K, J, I
    DICE_THRESHOLD = 0.5

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_geometry_round_trip()
        self.setUp()
        self.test_search_and_segment()

    @classmethod
    def _syntheticCase(cls, seed: int):
        """An image with a bright sphere and a darker box; truth = 1 sphere, 2 box."""
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
            node.SetIJKToRASDirectionMatrix(slicer.util.vtkMatrixFromArray(np.block([[rotation, np.zeros((3, 1))], [np.zeros((1, 3)), np.ones((1, 1))]])))
        return node

    def _addSegmentation(self, truth, volume, names: list):
        """A segmentation with the truth's segments added in ``names`` order (Sphere = 1, Box = 2)."""
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", volume.GetName() + " seg")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        values = {"Sphere": 1, "Box": 2}
        for name in names:
            segmentId = segmentationNode.GetSegmentation().AddEmptySegment(name, name)
            slicer.util.updateSegmentBinaryLabelmapFromArray((truth == values[name]).astype("uint8"), segmentationNode, segmentId, volume)
        return segmentationNode

    def test_geometry_round_trip(self) -> None:
        """Volume node -> Geometry (LPS) -> file -> back lands on the same IJK-to-RAS, exactly."""
        import numpy as np

        self.delayDisplay("Geometry round trip")
        image, _ = self._syntheticCase(0)
        node = self._addVolume(image, "oblique", oblique=True)
        logic = AutoNNUNetLogic()
        geometry = logic.volumeGeometry(node)
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        np.testing.assert_allclose(autoscene.ijk_to_ras_from_geometry(geometry), slicer.util.arrayFromVTKMatrix(matrix), rtol=0, atol=1e-12)
        path = Path(slicer.util.tempDirectory()) / "roundtrip.nrrd"
        logic.volumeFromNode(node).write(path)
        loaded = slicer.util.loadVolume(str(path))
        loadedMatrix = vtk.vtkMatrix4x4()
        loaded.GetIJKToRASMatrix(loadedMatrix)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(loadedMatrix), slicer.util.arrayFromVTKMatrix(matrix), rtol=0, atol=1e-9)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded), slicer.util.arrayFromVolume(node))
        self.delayDisplay("Geometry round trip passed")

    def test_search_and_segment(self) -> None:
        import numpy as np

        logic = AutoNNUNetLogic()
        missing = logic.missingDependencies()
        self.assertEqual(missing, [], f"install the dependencies first (module's Setup section): {missing}")
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

        self.delayDisplay("Exporting the dataset")
        datasetDir = logic.exportDataset(cases, ["Image"], None, workDir, 1, "SelfTest")
        datasetJson = json.loads((datasetDir / "dataset.json").read_text())
        self.assertEqual(datasetJson["labels"], {"background": 0, "Sphere": 1, "Box": 2})
        self.assertEqual(datasetJson["numTraining"], 6)

        self.delayDisplay("Fingerprint and plan")
        logic.startFingerprint(workDir)
        self.assertEqual(logic.waitForJob("fingerprint", 1800).state, "succeeded")

        self.delayDisplay("Tiny search (quick profile)")
        # The quick profile (1..9 epochs) with nnU-Net's default trained first at 9 epochs, so the
        # incumbent has seen enough iterations to find a bright sphere.
        settings = SearchSettings(space="hpo", profile="quick", maxTrials=2, folds="0", iterationsPerEpoch=20,
                                  priorFirst=True, device="cpu")
        logic.startSearch(workDir, settings)
        self.assertEqual(logic.waitForJob("search", 3600).state, "succeeded")
        modelDir = logic.incumbentModelDir(workDir)
        self.assertIsNotNone(modelDir)

        self.delayDisplay("Segmenting an oblique test volume with the incumbent")
        image, truth = self._syntheticCase(99)
        testVolume = self._addVolume(image, "test", oblique=True)
        job = logic.startPrediction(modelDir, [testVolume], workDir, device="cpu")
        self.assertEqual(logic.waitForJob("predict", 1800).state, "succeeded")
        segmentationNode = logic.loadPrediction(job)

        names = sorted(segmentationNode.GetSegmentation().GetSegment(s).GetName() for s in logic.segmentIds(segmentationNode))
        self.assertEqual(names, ["Box", "Sphere"])

        # Same grid as the input: export on the input's geometry and compare matrices and shape.
        labelmapNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        segmentIds = vtk.vtkStringArray()
        sphereId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName("Sphere")
        segmentIds.InsertNextValue(sphereId)
        slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(segmentationNode, segmentIds, labelmapNode, testVolume)
        outMatrix, inMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        labelmapNode.GetIJKToRASMatrix(outMatrix)
        testVolume.GetIJKToRASMatrix(inMatrix)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(outMatrix), slicer.util.arrayFromVTKMatrix(inMatrix), atol=1e-9)
        predicted = slicer.util.arrayFromVolume(labelmapNode) > 0
        self.assertEqual(predicted.shape, truth.shape)
        dice = 2.0 * np.logical_and(predicted, truth == 1).sum() / (predicted.sum() + (truth == 1).sum())
        self.delayDisplay(f"Sphere Dice {dice:.3f}")
        self.assertGreater(dice, self.DICE_THRESHOLD)
        self.delayDisplay("Search and segment test passed")
