"""AutoNNUNet: find the best nnU-Net for the labeled volumes in the Slicer scene.

The view: the module class, its parameter node, and the panel's wiring. What the panel means in
the library's terms lives in AutoNNUNetSlicerLib (parameters, logic, export, jobs, chart, install,
widget texts), and the work itself in AutoNNUNetLib (the library behind the ``autonnunet``
command and the remote runner). Long work runs as a job (a child process of Slicer's Python, or
a job on a remote runner) polled by a QTimer, so the UI never blocks.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
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

from AutoNNUNetLib.progress import format_event  # noqa: E402  (standard library only)
from AutoNNUNetSlicerLib import chart, collect, install, models, parameters, tasks  # noqa: E402
from AutoNNUNetSlicerLib import jobs as modulejobs  # noqa: E402
from AutoNNUNetSlicerLib import logic as scenelogic  # noqa: E402
from AutoNNUNetSlicerLib import widget as view  # noqa: E402
from AutoNNUNetSlicerLib.logic import SceneCase  # noqa: E402
from AutoNNUNetSlicerLib.session import ModuleSession  # noqa: E402
from AutoNNUNetSlicerLib.parameters import DEVICES, RUN_LOCAL, RUN_REMOTE, SEARCH_SPACES  # noqa: E402

#: Slicer settings keys. The runner URL and token live in the user's settings, never in the
#: scene, so a saved scene shared with a colleague does not carry the token.
SETTINGS_REMOTE_URL = "AutoNNUNet/RemoteURL"
SETTINGS_REMOTE_TOKEN = "AutoNNUNet/RemoteToken"
SETTINGS_REMOTE_HISTORY = "AutoNNUNet/RemoteURLHistory"  # JSON list, newest first
#: Remembered across restarts (a new scene starts with them) and the running jobs to find again.
SETTINGS_REMEMBERED = {"workDir": "AutoNNUNet/WorkDir", "modelDir": "AutoNNUNet/ModelDir"}
SETTINGS_JOBS = "AutoNNUNet/RunningJobs"


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
        self.parent.helpText = view.HELP_TEXT
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
    profile: Annotated[str, Choice(list(parameters.PROFILES))] = "default"
    totalEpochs: Annotated[int, WithinRange(0, 10000000)] = 2000
    wallTimeHours: Annotated[float, WithinRange(0.0, 10000.0)] = 0.0
    maxTrials: Annotated[int, WithinRange(0, 100000)] = 0
    minEpochs: Annotated[int, WithinRange(1, 10000)] = 10
    maxEpochs: Annotated[int, WithinRange(1, 10000)] = 1000
    folds: Annotated[str, Choice(list(parameters.FOLD_CHOICES))] = "0"
    iterationsPerEpoch: Annotated[int, WithinRange(0, 100000)] = 0  # 0 = the profile's own
    priorFirst: bool = False
    # 0 = plain PriorBand; the library's default 1 = Regularized PriorBand (faster trainings win ties).
    runtimeWeight: Annotated[float, WithinRange(0.0, 5.0)] = 1.0
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    runWhere: Annotated[str, Choice([RUN_LOCAL, RUN_REMOTE])] = RUN_LOCAL
    modelDir: Path = Path()
    mirroring: bool = False
    largestComponent: bool = False
    # The cases table (node IDs) and the class renames, saved with the scene (widget.cases_record).
    casesTable: str = "[]"
    classAliases: str = "{}"
    show3d: bool = True  # surfaces can take minutes on large volumes
    predictFolds: str = ""  # "" = every fold the model has
    predictDevice: Annotated[str, Choice(list(DEVICES))] = "auto"
    selectEpochs: Annotated[int, WithinRange(1, 10000)] = 1000  # the final training length of a selection
    selectTop: Annotated[int, WithinRange(0, 20)] = 1  # Pareto points besides the incumbent (jobs.params.MAX_TOP)
    remoteSearchJobId: str = ""  # the runner's last finished search, which a remote selection starts from
    outputSegmentation: slicer.vtkMRMLSegmentationNode


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
        self._restoringCases = False
        self._shownChannels: list = []
        self._timer: Optional[qt.QTimer] = None
        self._calls: list = []  # (BackgroundCall, on_done) pairs: short calls off the UI thread
        self._shownTrials: list = []
        self._searchAfterFingerprint = False  # Export, fingerprint and search: the last step waits

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
        self.ui.upgradeDependenciesButton.clicked.connect(self.onUpgradeDependencies)
        # Data
        self.ui.addAllLabeledButton.clicked.connect(self.onAddAllLabeled)
        self.ui.addCaseButton.clicked.connect(lambda: self._addCaseRow(None, []))
        self.ui.sampleDataButton.clicked.connect(self.onSampleData)
        self.ui.removeCaseButton.clicked.connect(self.onRemoveCases)
        self.ui.refreshClassesButton.clicked.connect(self.refreshClassTable)
        self.ui.classesTableWidget.itemChanged.connect(self.onClassItemChanged)
        self.ui.casesTableWidget.itemChanged.connect(lambda _item: self._saveCasesTable())
        self.ui.channelNamesLineEdit.editingFinished.connect(self._updateChannelColumns)
        self.ui.exportDatasetButton.clicked.connect(self.onExportDataset)
        self.ui.runAllButton.clicked.connect(self.onRunAll)
        # Fingerprint
        self.ui.runFingerprintButton.clicked.connect(self.onRunFingerprint)
        self.ui.showFingerprintButton.clicked.connect(self.onShowFingerprint)
        # Search
        self.ui.startButton.clicked.connect(lambda: self.onStartSearch(resume=False))
        self.ui.resumeButton.clicked.connect(lambda: self.onStartSearch(resume=True))
        self.ui.stopButton.clicked.connect(self.onStop)
        self.ui.testConnectionButton.clicked.connect(self.onTestConnection)
        self.ui.showChartButton.clicked.connect(lambda: chart.show_chart())
        self.ui.remoteUrlLineEdit.editingFinished.connect(self._saveRemoteSettings)
        self.ui.remoteTokenLineEdit.editingFinished.connect(self._saveRemoteSettings)
        self.ui.whereComboBox.currentIndexChanged.connect(self._updateRemoteWidgets)
        # Results
        self.ui.loadResultsButton.clicked.connect(self.onLoadResults)
        self.ui.paretoOnlyCheckBox.toggled.connect(lambda _checked: self._showTrials(self._shownTrials))
        self.ui.useIncumbentButton.clicked.connect(self.onUseIncumbent)
        self.ui.useSelectedTrialButton.clicked.connect(self.onUseSelectedTrial)
        self.ui.selectModelButton.clicked.connect(self.onSelectModel)
        self.ui.exportModelButton.clicked.connect(self.onExportModel)
        self.ui.importModelButton.clicked.connect(self.onImportModel)
        self.ui.modelPathLineEdit.currentPathChanged.connect(self._onModelPathEdited)
        # Inference
        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.ui.cancelSegmentButton.clicked.connect(lambda: self.onCancel("predict"))

        settings = qt.QSettings()
        self.ui.remoteUrlLineEdit.text = str(settings.value(SETTINGS_REMOTE_URL, ""))
        self.ui.remoteTokenLineEdit.text = str(settings.value(SETTINGS_REMOTE_TOKEN, ""))
        self._updateUrlCompleter()
        self.ui.remoteTokenLineEdit.toolTip = view.TOKEN_STORAGE_NOTE
        self.ui.remoteTokenLineEdit.placeholderText = "token (kept in Slicer.ini as plain text)"

        # One timer polls every running job and background call; it runs only while one does.
        self._timer = qt.QTimer()
        self._timer.setInterval(1000)
        self._timer.timeout.connect(self.onPollJobs)

        self.initializeParameterNode()
        self._updateInferenceInputs()
        self._updateRemoteWidgets()
        self._reattachJobs()
        self._updateButtons()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None and self.logic.board.any_running():
            # Local job trees are in their own process group and would outlive Slicer: ask.
            running = ", ".join(kind for kind, entry in self.logic.board.jobs.items() if not entry.done)
            keep = slicer.util.confirmYesNoDisplay(
                f"AutoNNUNet is still running: {running}.\n\nKeep it running after Slicer closes? AutoNNUNet "
                "watches it again on the next start (a segmentation is always stopped). No stops it now.",
                "AutoNNUNet")
            self.logic.board.shutdown(keep_running=keep)
            self._saveJobs()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        # A prediction holds its input node: it cannot land in the next scene.
        for kind in self.logic.board.close_scene():
            self._appendLog(f"{kind} cancelled: the scene closed.")
        self.setParameterNode(None)
        self.ui.casesTableWidget.setRowCount(0)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        settings = qt.QSettings()
        remembered = {name: str(settings.value(key, "")) for name, key in SETTINGS_REMEMBERED.items()}
        self.setParameterNode(self.logic.getParameterNode(remembered))

    def setParameterNode(self, inputParameterNode: Optional[AutoNNUNetParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets carrying a SlicerParameterName property in the .ui follow the node both ways.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._updateChannelColumns()
        self._showModelDir()
        self._restoreCasesTable()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        # Another node (a loaded scene) may bring other channel names: the columns follow them.
        if self._channelNames() != self._shownChannels:
            self._updateChannelColumns()
        self._showModelDir()
        self._updateButtons()  # the working folder, model folder or Run on may have changed
        settings = qt.QSettings()
        for name, key in SETTINGS_REMEMBERED.items():
            value = view.model_folder_text(getattr(self._parameterNode, name)) if self._parameterNode else ""
            if value and str(settings.value(key, "")) != value:
                settings.setValue(key, value)

    def _showModelDir(self) -> None:
        """The model folder follows the node by hand: bound directly, an unset Path() shows as "."."""
        text = view.model_folder_text(self._parameterNode.modelDir) if self._parameterNode else ""
        if self.ui.modelPathLineEdit.currentPath != text:
            self.ui.modelPathLineEdit.currentPath = text

    def _onModelPathEdited(self, path) -> None:
        text = view.model_folder_text(path)
        if self._parameterNode and view.model_folder_text(self._parameterNode.modelDir) != text:
            self._parameterNode.modelDir = Path(text) if text else Path()
        self._updateInferenceInputs()

    # -- helpers ---------------------------------------------------------------------------------

    def _workDir(self) -> Path:
        return Path(self._parameterNode.workDir).expanduser()

    def _channelNames(self) -> list:
        return view.channel_names(self.ui.channelNamesLineEdit.text)

    def _appendLog(self, text: str) -> None:
        if text:
            self.ui.logTextEdit.appendPlainText(text.rstrip("\n"))

    def _updateButtons(self) -> None:
        board = self.logic.board
        folder = modulejobs.workspace_state(self._workDir()) if self._parameterNode else {}
        facts = view.PanelFacts(
            cases=self.ui.casesTableWidget.rowCount, model=bool(self._parameterNode)
            and view.is_model_folder_set(self._parameterNode.modelDir),
            remote=self.ui.whereComboBox.currentText == RUN_REMOTE,
            remote_search=bool(self._parameterNode and self._parameterNode.remoteSearchJobId),
            running={kind for kind in board.jobs if board.running(kind)}, **folder)
        for name, enabled in view.button_states(facts).items():
            getattr(self.ui, name).enabled = enabled

    def _updateRemoteWidgets(self, *_args) -> None:
        remote = self.ui.whereComboBox.currentText == RUN_REMOTE
        for widget in (self.ui.remoteUrlLineEdit, self.ui.remoteTokenLineEdit, self.ui.testConnectionButton):
            widget.enabled = remote
        self._updateButtons()

    def _saveRemoteSettings(self) -> None:
        settings = qt.QSettings()
        url = self.ui.remoteUrlLineEdit.text.strip()
        settings.setValue(SETTINGS_REMOTE_URL, url)
        settings.setValue(SETTINGS_REMOTE_TOKEN, self.ui.remoteTokenLineEdit.text.strip())
        history = view.url_history(str(settings.value(SETTINGS_REMOTE_HISTORY, "[]")), url)
        settings.setValue(SETTINGS_REMOTE_HISTORY, json.dumps(history))
        self._updateUrlCompleter()

    def _runner(self) -> tuple:
        """The runner's URL and token as typed, remembered in Slicer's settings first."""
        self._saveRemoteSettings()
        return self.ui.remoteUrlLineEdit.text.strip(), self.ui.remoteTokenLineEdit.text.strip()

    def _updateUrlCompleter(self) -> None:
        """The runner URLs used before, offered while typing."""
        history = view.url_history(str(qt.QSettings().value(SETTINGS_REMOTE_HISTORY, "[]")))
        self.ui.remoteUrlLineEdit.setCompleter(qt.QCompleter(history))

    def _ensureDependencies(self, remoteOnly: bool = False) -> bool:
        """Check (and offer to install) what the work needs before the first real work."""
        if not self.logic.missingDependencies(remoteOnly):
            return True
        self.onInstallDependencies()
        return not self.logic.missingDependencies(remoteOnly)

    def _startPolling(self) -> None:
        self._updateButtons()
        self._saveJobs()
        if not self._timer.isActive():
            self._timer.start()

    def _saveJobs(self) -> None:
        """The running jobs, so that a restarted Slicer finds them again (see _reattachJobs)."""
        records = [modulejobs.job_record(entry) for entry in self.logic.board.jobs.values()]
        qt.QSettings().setValue(SETTINGS_JOBS, json.dumps([r for r in records if r]))

    def _reattachJobs(self) -> None:
        """Pick up the jobs that ran when Slicer last closed (see jobs.reattach_all)."""
        records = modulejobs.parse_job_records(str(qt.QSettings().value(SETTINGS_JOBS, "[]")))
        modulejobs.reattach_all(self.logic.board, records, self.ui.remoteTokenLineEdit.text.strip(),
                                background=self._runInBackground, log=self._appendLog)
        if self.logic.board.jobs:
            self._startPolling()

    def _runInBackground(self, name: str, function, onDone) -> None:
        """A short call (network) in a worker thread; ``onDone(result_or_error)`` on the UI thread."""
        self._calls.append((tasks.BackgroundCall(name, function), onDone))
        self._startPolling()

    # -- Setup section ---------------------------------------------------------------------------

    def onInstallDependencies(self) -> None:
        missing = self.logic.missingDependencies()
        if not missing:
            self.ui.dependencyStatusLabel.text = "All dependencies installed: " + install.versions_text()
            if not self.logic.board.running("versions"):
                # Whether torch sees a GPU is asked in a child: Slicer does not import torch for it.
                with slicer.util.tryWithErrorDisplay("Could not check the versions.", waitCursor=True):
                    self.logic.startVersionsCheck(self._workDir())
                    self._startPolling()
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
            # The question above covers the PyTorch extension too: the install asks nothing more.
            result = install.install_dependencies(install.SlicerInstaller(log=self._setDependencyStatus, confirmed=True))
            self._setDependencyStatus(result.message)
            if result.needs_restart and slicer.util.confirmYesNoDisplay(
                result.message + "\n\nRestart Slicer now?", "AutoNNUNet dependencies"
            ):
                slicer.util.restart()

    def onUpgradeDependencies(self) -> None:
        if not slicer.util.confirmOkCancelDisplay("Upgrade nnU-Net, NePS and the other pip packages to the newest "
                                                  "versions AutoNNUNet allows?", "AutoNNUNet dependencies"):
            return
        with slicer.util.tryWithErrorDisplay("Upgrading failed.", waitCursor=True):
            result = install.upgrade_dependencies(install.SlicerInstaller(log=self._setDependencyStatus, confirmed=True))
            self._setDependencyStatus(result.message)
            if result.needs_restart and slicer.util.confirmYesNoDisplay(result.message + "\n\nRestart Slicer now?",
                                                                        "AutoNNUNet dependencies"):
                slicer.util.restart()

    def _setDependencyStatus(self, text: str) -> None:
        self.ui.dependencyStatusLabel.text = text
        slicer.app.processEvents()

    # -- Data section ----------------------------------------------------------------------------

    def _updateChannelColumns(self) -> None:
        """One volume column per channel name; existing picks are kept by position."""
        table = self.ui.casesTableWidget
        channels = self._channelNames()
        self._shownChannels = channels
        table.setColumnCount(len(view.CASE_FIXED_COLUMNS) + len(channels))
        table.setHorizontalHeaderLabels(view.case_columns(channels))
        for row in range(table.rowCount):
            for column in range(2, 2 + len(channels)):
                if table.cellWidget(row, column) is None:
                    table.setCellWidget(row, column, self._volumeSelector(None))
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
        table.setItem(row, 0, qt.QTableWidgetItem(scenelogic.case_id_from_name(name, taken)))
        segmentationSelector = self._nodeSelector("vtkMRMLSegmentationNode", segmentationNode)
        segmentationSelector.currentNodeChanged.connect(lambda _node: self._onCaseSegmentationChanged(segmentationSelector))
        table.setCellWidget(row, 1, segmentationSelector)
        for index in range(len(self._channelNames())):
            node = volumeNodes[index] if index < len(volumeNodes) else None
            table.setCellWidget(row, 2 + index, self._volumeSelector(node))

    def _volumeSelector(self, node):
        selector = self._nodeSelector("vtkMRMLScalarVolumeNode", node)
        selector.currentNodeChanged.connect(lambda _node: self._saveCasesTable())
        return selector

    def _saveCasesTable(self) -> None:
        """The cases table and class renames into the parameter node (saved with the scene)."""
        if self._parameterNode is None or self._restoringCases:
            return
        self._parameterNode.casesTable = view.cases_record(self._casesFromTable())
        self._parameterNode.classAliases = json.dumps(self._classAliases, sort_keys=True)

    def _restoreCasesTable(self) -> None:
        """Rows from the parameter node of a (re)loaded scene, nodes found again by their IDs."""
        if self._parameterNode is None or self.ui.casesTableWidget.rowCount:
            return
        self._classAliases = view.parse_class_aliases(self._parameterNode.classAliases)
        self._restoringCases = True
        try:
            for row, saved in enumerate(view.parse_cases_record(self._parameterNode.casesTable)):
                segmentation = slicer.mrmlScene.GetNodeByID(saved["segmentation"]) if saved["segmentation"] else None
                volumes = [slicer.mrmlScene.GetNodeByID(i) if i else None for i in saved["volumes"]]
                self._addCaseRow(segmentation, volumes)
                self.ui.casesTableWidget.item(row, 0).setText(saved["case"])
        finally:
            self._restoringCases = False
        self.refreshClassTable()

    def _onCaseSegmentationChanged(self, selector) -> None:
        """A newly picked segmentation brings its reference volume as the first channel."""
        table = self.ui.casesTableWidget
        for row in range(table.rowCount):
            if table.cellWidget(row, 1) == selector:  # rows shift on removal: find the selector's row now
                firstChannel = table.cellWidget(row, 2)
                reference = scenelogic.reference_volume(selector.currentNode())
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
        present = {case.segmentation_node.GetID() for case in self._casesFromTable() if case.segmentation_node is not None}
        added = 0
        for segmentationNode, referenceVolume in scenelogic.labeled_segmentations():  # predictions are skipped
            if segmentationNode.GetID() in present:
                continue
            self._addCaseRow(segmentationNode, [referenceVolume] if referenceVolume is not None else [])
            added += 1
        self.ui.dataStatusLabel.text = f"Added {added} case(s)." if added else "No new segmentations with segments in the scene."
        self.refreshClassTable()

    def onSampleData(self) -> None:
        """Generated cases in the scene, ready to export (then fingerprint and a quick search)."""
        with slicer.util.tryWithErrorDisplay("Could not generate the sample data.", waitCursor=True):
            cases, channels = scenelogic.add_sample_cases()
            self._parameterNode.channelNames = ", ".join(channels)
            self._updateChannelColumns()
            for case in cases:
                self._addCaseRow(case.segmentation_node, case.volume_nodes)
            self._parameterNode.profile = "quick"
            self.ui.dataStatusLabel.text = (f"Added {len(cases)} generated cases ({', '.join(channels)}); "
                                            "export them, fingerprint, then Start a quick search.")
            self.refreshClassTable()

    def onRemoveCases(self) -> None:
        table = self.ui.casesTableWidget
        for row in sorted({index.row() for index in table.selectedIndexes()}, reverse=True):
            table.removeRow(row)
        self.refreshClassTable()

    def refreshClassTable(self) -> None:
        """Classes from the segment names of the listed cases (same name = same class)."""
        segmentNames = [scenelogic.segment_names(c.segmentation_node) for c in self._casesFromTable()
                        if c.segmentation_node is not None]
        table = self.ui.classesTableWidget
        self._updatingClassTable = True
        try:
            try:
                rows = view.class_table_rows(segmentNames, self._classAliases)
            except ValueError as error:
                self.ui.dataStatusLabel.text = str(error)
                rows = []
            table.setRowCount(len(rows))
            for index, classRow in enumerate(rows):
                for column, text in enumerate(view.class_cells(classRow)):
                    item = qt.QTableWidgetItem(text)
                    if column != 1:  # only the class name is editable
                        item.setFlags(item.flags() & ~qt.Qt.ItemIsEditable)
                    table.setItem(index, column, item)
        finally:
            self._updatingClassTable = False
        self._saveCasesTable()
        self._updateButtons()

    def onClassItemChanged(self, item) -> None:
        if self._updatingClassTable or item.column() != 1:
            return
        segmentName = self.ui.classesTableWidget.item(item.row(), 0).text()
        self._classAliases[segmentName] = item.text().strip() or segmentName
        self.refreshClassTable()

    def onRunAll(self) -> None:
        """Export, then fingerprint, then search: each step starts when the one before succeeded."""
        if not self.onExportDataset():
            return
        if self._parameterNode.runWhere == RUN_REMOTE:
            self.onStartSearch(resume=False)  # the runner fingerprints and plans the upload itself
            return
        self.onRunFingerprint()
        # The search follows only a fingerprinting that did start (dependencies may be missing).
        self._searchAfterFingerprint = self.logic.board.running("fingerprint")

    def onExportDataset(self) -> bool:
        # Export needs only numpy and SimpleITK, which Slicer ships: no dependency check here.
        progress = slicer.util.createProgressDialog(parent=slicer.util.mainWindow(), labelText="Exporting dataset...", maximum=100)

        def report(event) -> None:
            fraction = event.data.get("fraction")
            if fraction is not None:
                progress.value = int(100 * float(fraction))
            if event.data.get("message"):
                progress.labelText = str(event.data["message"])
            slicer.app.processEvents()

        try:
            folder = self.logic.exportDataset(self._casesFromTable(), self._channelNames(), self._classAliases,
                                              self._workDir(), self._parameterNode.datasetId,
                                              self._parameterNode.datasetName, progress=report)
        except Exception as error:  # DatasetError (a ValueError) names each case and its problem
            self.ui.dataStatusLabel.text = str(error)
            if not isinstance(error, ValueError):
                logging.exception("AutoNNUNet: dataset export failed")
            slicer.util.errorDisplay("The dataset was not exported:\n\n" + str(error), windowTitle="AutoNNUNet")
            return False
        finally:
            progress.close()
        self.ui.dataStatusLabel.text = f"Dataset written to {folder}"
        self._updateButtons()
        return True

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
        # The summary reads nnU-Net's plans in a child process: Slicer never imports torch for it.
        with slicer.util.tryWithErrorDisplay("Could not read the fingerprint.", waitCursor=True):
            self.logic.startFingerprint(self._workDir(), summaryOnly=True)
            self.ui.fingerprintTextEdit.setPlainText("Reading the fingerprint and plans...")
            self._startPolling()

    # -- Search section --------------------------------------------------------------------------

    def onStartSearch(self, resume: bool) -> None:
        remote = self._parameterNode.runWhere == RUN_REMOTE
        if remote and resume:
            slicer.util.infoDisplay("A remote search resumes on its runner by itself (also after a runner restart); "
                                    "Start submits a new one.", windowTitle="AutoNNUNet")
            return
        # A remote search needs only the client (requests) here; a local one everything.
        if not self._ensureDependencies(remoteOnly=remote):
            return
        with slicer.util.tryWithErrorDisplay("Could not start the search.", waitCursor=True):
            settings = parameters.search_settings(parameters.node_values(self._parameterNode))  # validated here
            if remote:
                self.logic.startRemoteSearch(self._workDir(), settings, *self._runner())
            else:
                if not resume and modulejobs.has_search(self._workDir()):
                    # A new search must not silently mix with the trials of an old one.
                    if not slicer.util.confirmOkCancelDisplay(
                        f"{modulejobs.search_root(self._workDir())} holds a previous search. Keep it (renamed) and "
                        "start a new one?\n(Use Resume to continue it instead.)", "AutoNNUNet"):
                        return
                self.logic.startSearch(self._workDir(), settings, resume=resume)
            self.ui.logTextEdit.clear()
            self._appendLog(("Resuming" if resume else "Starting") + " search...")
            self.ui.progressBar.value = 0
            self.ui.bestDiceLabel.text = "-"
            self._startPolling()

    def onTestConnection(self) -> None:
        url, token = self._runner()
        self.ui.testConnectionButton.enabled = False
        self.ui.statusLabel.text = f"Contacting {url}..."

        def done(result) -> None:
            self.ui.testConnectionButton.enabled = True
            if isinstance(result, Exception):
                self.ui.statusLabel.text = "The runner did not answer."
                slicer.util.errorDisplay(f"The runner did not answer:\n\n{result}", windowTitle="AutoNNUNet runner")
            else:
                self.ui.statusLabel.text = result
                slicer.util.infoDisplay(result, windowTitle="AutoNNUNet runner")

        self._runInBackground("connection", lambda: tasks.test_connection(url, token), done)

    def onStop(self) -> None:
        """Stop whatever runs on the working folder (the search, the selection or the fingerprinting)."""
        for kind in ("search", "select", "fingerprint"):
            if self.logic.board.running(kind):
                self.onCancel(kind)

    def onCancel(self, kind: str) -> None:
        self.logic.board.cancel(kind)
        self._appendLog(f"Cancelling {kind}...")

    def onPollJobs(self) -> None:
        """QTimer slot: fold new events and log text of every job into the UI."""
        for call, onDone in list(self._calls):
            if call.done():
                self._calls.remove((call, onDone))
                try:
                    result = call.result()
                except Exception as error:  # shown to the user by onDone
                    result = error
                onDone(result)
        for entry, update in self.logic.board.poll():
            if entry.kind in ("search", "select"):  # other jobs keep their own log (see their job folder)
                self._appendLog(update.log)
                for event in update.events:
                    line = format_event(event)
                    if line and event.kind != "epoch":  # epoch lines go to the status label, not the log
                        self._appendLog(line)
                progress = entry.progress
                self.ui.statusLabel.text = ("Selection: " if entry.kind == "select" else "") + progress.status_text()
                self.ui.progressBar.value = progress.percent()
                if entry.kind == "search":
                    self.ui.bestDiceLabel.text = progress.best_text()
                if any(e.kind == "trial_finished" for e in update.events):
                    chart.show_points(progress.points())
            elif entry.kind == "predict":
                self.ui.inferenceStatusLabel.text = view.predict_status_text(entry.progress)
            if entry.done:
                self._onJobFinished(entry)
        if not self.logic.board.any_running() and not self._calls:
            self._timer.stop()
            self._saveJobs()
        self._updateButtons()

    def _onJobFinished(self, entry) -> None:
        kind, context = entry.kind, entry.context
        text = view.job_end_text(kind, entry.state, entry.message, entry.stopped, entry.cancelled_by_scene_close)
        self._appendLog(f"{kind} {entry.state}" + (f": {entry.message}" if entry.message else ""))
        if kind == "predict":
            self.ui.inferenceStatusLabel.text = text
        elif kind in ("search", "select"):
            self.ui.statusLabel.text = text
        if entry.cancelled_by_scene_close:
            return
        if kind == "fingerprint" and self._searchAfterFingerprint:
            self._searchAfterFingerprint = False
            if entry.state == "succeeded":
                self.ui.fingerprintTextEdit.setPlainText(view.summary_from_log(entry.log))
                self._updateButtons()
                self.onStartSearch(resume=False)
                return
        if entry.state != "succeeded":
            if kind == "fingerprint":
                self.ui.fingerprintTextEdit.setPlainText(text + "\n\n" + view.summary_from_log(entry.log))
            if entry.state == "failed":
                slicer.util.errorDisplay(f"{kind} failed: {entry.message}\n{view.log_tail(entry.log)}\n\n"
                                         f"The full log is in {entry.log_location}.", windowTitle="AutoNNUNet")
            return
        with slicer.util.tryWithErrorDisplay(f"Could not load the {kind} result.", waitCursor=True):
            if kind == "versions":
                self.ui.dependencyStatusLabel.text = "All dependencies installed: " + view.versions_from_log(entry.log)
            elif kind == "fingerprint":
                self.ui.fingerprintTextEdit.setPlainText(view.summary_from_log(entry.log))
            elif kind == "model":
                if context.model_dir is not None:  # an import: use the imported model
                    modelDir = modulejobs.imported_model_dir(context.model_dir)
                    self._parameterNode.modelDir = modelDir or context.model_dir
                    self.ui.statusLabel.text = f"Model imported into {modelDir or context.model_dir}"
                else:
                    slicer.util.infoDisplay(f"Model written to {context.output_file}", windowTitle="AutoNNUNet")
            elif kind in ("search", "select"):
                self.ui.progressBar.value = 100
                if context.remote:
                    if kind == "search":  # its results, and the id a remote selection starts from
                        self._parameterNode.remoteSearchJobId = entry.job.job_id
                        self._showTrials(self.logic.trialRows(context.download_dir))
                    if getattr(entry.job, "output", None) is not None:  # model.zip or selection.zip
                        self._collectRemoteModel(Path(entry.job.output), context.download_dir / (
                            "model" if kind == "search" else "selection"))
                elif kind == "search":
                    # The job's own working folder, even if the panel now shows another one.
                    self._showTrials(self.logic.trialRows(context.search_root))
                    self._parameterNode.modelDir = self.logic.incumbentModelDir(context.search_root) or \
                        self._parameterNode.modelDir
                else:
                    self._parameterNode.modelDir = context.model_dir  # the selection root
            elif kind == "predict":
                segmentationNode = self.logic.loadPrediction(entry)
                if self._parameterNode is not None:
                    self._parameterNode.outputSegmentation = segmentationNode  # the next run refills it
                self.ui.inferenceStatusLabel.text = f"Segmented into '{segmentationNode.GetName()}'."

    def _collectRemoteModel(self, modelZip: Path, dest: Path) -> None:
        """The runner's model zip becomes the model folder, with requests only: unzipped off the UI
        thread, read from its JSON files, checkpoints not opened (the runner checked them)."""
        self.ui.statusLabel.text = f"Collecting the runner's model from {modelZip}..."

        def done(result) -> None:
            if isinstance(result, Exception):
                self.ui.statusLabel.text = f"The runner's model could not be collected: {result}"
                slicer.util.errorDisplay(f"The runner's model could not be collected:\n\n{result}", windowTitle="AutoNNUNet")
                return
            if self._parameterNode is not None:
                self._parameterNode.modelDir = result.path
            missing = self.logic.missingDependencies()
            self.ui.statusLabel.text = view.collected_text(result, needs_install=bool(missing))

        self._runInBackground("collect", lambda: collect.collect_remote_model(modelZip, dest), done)

    # -- Results section -------------------------------------------------------------------------

    def onLoadResults(self) -> None:
        root = modulejobs.search_root(self._workDir())
        rows = self.logic.trialRows(root)
        self._showTrials(rows)
        if not rows:
            self._appendLog(f"No results.json in {root} yet.")

    def _showTrials(self, rows: list) -> None:
        self._shownTrials = rows
        table = self.ui.trialsTableWidget
        visible = [r for r in rows if r.pareto or not self.ui.paretoOnlyCheckBox.checked]
        table.setRowCount(len(visible))
        for index, row in enumerate(visible):
            for column, text in enumerate(view.trial_cells(row)):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(view.trial_tooltip(row, column))
                table.setItem(index, column, item)
        chart.show_points(self.logic.trialPoints(rows))

    def onUseIncumbent(self) -> None:
        modelDir = self.logic.incumbentModelDir(modulejobs.search_root(self._workDir()))
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

    def onSelectModel(self) -> None:
        """nnU-Net's own model selection after the search: the candidates on 5 folds, the best
        model or pairwise ensemble by cross-validation Dice, and its postprocessing."""
        remote = self._parameterNode.runWhere == RUN_REMOTE
        if not self._ensureDependencies(remoteOnly=remote):
            return
        with slicer.util.tryWithErrorDisplay("Could not start the model selection.", waitCursor=True):
            params = parameters.select_params(parameters.node_values(self._parameterNode, parameters.SELECT_FIELDS))
            if remote:
                self.logic.startRemoteSelection(self._workDir(), self._parameterNode.remoteSearchJobId, params,
                                                *self._runner())
            else:
                self.logic.startSelection(self._workDir(), params)
            self._appendLog(f"Starting the model selection ({params.epochs} epochs per fold)...")
            self.ui.progressBar.value = 0
            self._startPolling()

    def onExportModel(self) -> None:
        if not view.is_model_folder_set(self._parameterNode.modelDir):
            slicer.util.warningDisplay("Choose a model folder first.", windowTitle="AutoNNUNet")
            return
        modelDir = Path(self._parameterNode.modelDir)
        path = qt.QFileDialog.getSaveFileName(None, "Export model", str(self._workDir() / f"{modelDir.name}.zip"), "Zip (*.zip)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Model export failed.", waitCursor=True):
            self.logic.startModelExport(self._workDir(), modelDir, Path(path))  # checkpoints load in a child
            self._startPolling()

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(None, "Import model", str(self._workDir()), "Zip (*.zip)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Model import failed.", waitCursor=True):
            self.logic.startModelImport(self._workDir(), Path(path))
            self._startPolling()

    # -- Inference section -----------------------------------------------------------------------

    def _updateInferenceInputs(self) -> None:
        """One input row per channel of the current model (one row when no model is chosen); a
        selection's members (checkable), its folds and its TTA."""
        table = self.ui.inferenceInputsTableWidget
        # Read the path from the widget: this runs from its own signal, maybe before the node follows.
        model = models.try_describe(view.model_folder_text(self.ui.modelPathLineEdit.currentPath))
        channels = (model.channel_names if model else []) or ["Image"]
        previous = [table.cellWidget(r, 1).currentNode() if table.cellWidget(r, 1) else None for r in range(table.rowCount)]
        table.setRowCount(len(channels))
        for row, name in enumerate(channels):
            item = qt.QTableWidgetItem(name)
            item.setFlags(item.flags() & ~qt.Qt.ItemIsEditable)
            table.setItem(row, 0, item)
            table.setCellWidget(row, 1, self._nodeSelector("vtkMRMLScalarVolumeNode", previous[row] if row < len(previous) else None))
        table.horizontalHeader().setSectionResizeMode(1, qt.QHeaderView.Stretch)
        members = self.ui.predictMembersListWidget
        members.clear()
        for name in model.member_names if model else []:
            item = qt.QListWidgetItem(name)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked)
            members.addItem(item)
        selection = bool(model and model.selection)
        for widget in (members, self.ui.predictMembersLabel):
            widget.visible = selection
        self.ui.largestComponentCheckBox.enabled = not selection  # a selection has its own postprocessing
        self.ui.predictFoldsLineEdit.placeholderText = model.folds_text() if model else "folds: all"
        if selection and self._parameterNode is not None:
            self._parameterNode.mirroring = bool(model.mirroring)  # what the cross-validation used
            self._parameterNode.largestComponent = False

    def onSegment(self) -> None:
        if not self._ensureDependencies():
            return
        if not view.is_model_folder_set(self._parameterNode.modelDir):
            slicer.util.warningDisplay("Choose a model folder first (Results section).", windowTitle="AutoNNUNet")
            return
        table = self.ui.inferenceInputsTableWidget
        volumes = [table.cellWidget(r, 1).currentNode() for r in range(table.rowCount)]
        if any(v is None for v in volumes):
            slicer.util.warningDisplay("Pick an input volume for every channel.", windowTitle="AutoNNUNet")
            return
        listed = self.ui.predictMembersListWidget
        members = [listed.item(i).text() for i in range(listed.count) if listed.item(i).checkState() == qt.Qt.Checked]
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            self.logic.startPrediction(Path(p.modelDir), volumes, self._workDir(), device=p.predictDevice,
                                       mirroring=p.mirroring, largestComponent=p.largestComponent,
                                       outputSegmentation=p.outputSegmentation, show3d=p.show3d,
                                       folds=view.predict_folds(p.predictFolds), members=members if listed.count else None)
            self.ui.inferenceStatusLabel.text = "Segmenting in the background..."
            self._startPolling()


#
# AutoNNUNetLogic
#


class AutoNNUNetLogic(ScriptedLoadableModuleLogic, ModuleSession):
    """The module's actions (AutoNNUNetSlicerLib.session) plus the scene's parameter node."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        ModuleSession.__init__(self)

    def getParameterNode(self, remembered: Optional[dict] = None) -> AutoNNUNetParameterNode:
        """The scene's parameter node; a new one starts from the ``remembered`` folders (workDir,
        modelDir: what the user last used, kept in Slicer's settings)."""
        raw = super().getParameterNode()
        fresh = not raw.GetParameter("workDir")  # before the wrapper writes its defaults
        node = AutoNNUNetParameterNode(raw)
        if fresh:
            for name, value in (remembered or {}).items():
                if value:
                    setattr(node, name, Path(value))
        return node


# The self-test lives in Testing/Python/; Slicer's "Reload and Test" finds it here by name.
_SELF_TEST_DIR = os.path.join(_MODULE_DIR, "Testing", "Python")
if _SELF_TEST_DIR not in sys.path:
    sys.path.insert(0, _SELF_TEST_DIR)
from AutoNNUNetSelfTest import AutoNNUNetTest  # noqa: E402,F401
