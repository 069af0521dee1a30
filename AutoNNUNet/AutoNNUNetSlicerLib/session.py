"""The module's actions without widgets: what the panel, the self-test and the Python console call.

:class:`ModuleSession` ties the pieces together: scene cases to a dataset (logic, export), jobs
with their context (jobs.JobBoard), results and models. It imports no Slicer at import time (the
scene calls sit in logic.py), so pytest drives it; the module's Logic class
(``AutoNNUNetLogic``) is this session plus Slicer's parameter node.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from . import install
from . import jobs as modulejobs
from . import logic as scenelogic
from . import models
from .export import export_dataset


class ModuleSession:
    """The module's jobs (one board) and actions. Method names follow Slicer's Logic style."""

    def __init__(self) -> None:
        self.board = modulejobs.JobBoard()

    @staticmethod
    def missingDependencies(remoteOnly: bool = False) -> list:
        return install.missing_requirements(remote_only=remoteOnly)

    # -- data ------------------------------------------------------------------------------------

    @staticmethod
    def exportDataset(cases: list, channelNames: list, aliases: Optional[dict], workDir: Path, datasetId: int = 1,
                      datasetName: str = "AutoNNUNet", progress=None) -> Path:
        """Scene cases -> nnU-Net raw dataset in ``workDir``, one case in memory at a time."""
        from AutoNNUNetLib.dataset import DatasetError, Problem

        problems = scenelogic.check_cases(cases, len(channelNames))
        if problems:
            raise DatasetError([Problem(caseId, message) for caseId, message in problems])
        readers = [scenelogic.case_reader(case, len(channelNames)) for case in cases]
        return export_dataset(readers, channelNames, aliases, Path(workDir), datasetId, datasetName, progress=progress)

    # -- jobs ------------------------------------------------------------------------------------

    def _free(self, kind: str) -> None:
        """Refuse before starting anything: a second job of a kind would be started and lost."""
        if self.board.running(kind):
            raise RuntimeError(f"a {kind} job is already running")

    def startFingerprint(self, workDir: Path, summaryOnly: bool = False):
        self._free("fingerprint")
        job, context = modulejobs.start_fingerprint(workDir, summary_only=summaryOnly)
        return self.board.add("fingerprint", job, context)

    def startSearch(self, workDir: Path, settings, resume: bool = False):
        """A local search in a child process; ``resume`` continues the existing search folder."""
        self._free("search")
        job, context = modulejobs.start_search(workDir, settings, resume=resume)
        return self.board.add("search", job, context)

    def startRemoteSearch(self, workDir: Path, settings, url: str, token: str):
        self._free("search")
        job, context = modulejobs.start_remote_search(workDir, settings, url, token)
        return self.board.add("search", job, context)

    def startSelection(self, workDir: Path, params):
        """nnU-Net's model selection on the working folder's search (``SelectParams``), locally."""
        self._free("select")
        job, context = modulejobs.start_selection(workDir, params)
        return self.board.add("select", job, context)

    def startRemoteSelection(self, workDir: Path, searchJobId: str, params, url: str, token: str):
        self._free("select")
        job, context = modulejobs.start_remote_selection(workDir, searchJobId, params, url, token)
        return self.board.add("select", job, context)

    def startVersionsCheck(self, workDir: Path):
        self._free("versions")
        job, context = modulejobs.start_versions_check(workDir)
        return self.board.add("versions", job, context)

    def startModelExport(self, workDir: Path, modelDir: Path, zipPath: Path):
        self._free("model")
        job, context = modulejobs.start_model_export(workDir, modelDir, zipPath)
        return self.board.add("model", job, context)

    def startModelImport(self, workDir: Path, zipPath: Path, dest: Optional[Path] = None):
        """Unpack and check a model zip in a child (a remote search's model too: Slicer itself
        never loads torch for it)."""
        self._free("model")
        job, context = modulejobs.start_model_import(workDir, zipPath, dest=dest)
        return self.board.add("model", job, context)

    def startPrediction(self, modelDir: Path, volumeNodes: list, workDir: Path, device: str = "auto",
                        mirroring: bool = False, largestComponent: bool = False, outputSegmentation=None,
                        show3d: bool = True, folds=None, members=None):
        """Write the input channels (exact geometry) and segment them in a child process.

        ``modelDir`` is a model folder or a selection root; ``members`` are the checked members of
        a selection (None: all). The picks are checked against the model first (models.predict_choice).
        """
        from .terminology import prediction_looks

        self._free("predict")
        description = models.describe_model(modelDir)
        if description.selection and largestComponent:
            raise ValueError("a selection applies the postprocessing it selected; uncheck Largest component")
        choice = models.predict_choice(description, folds, description.member_names if members is None else members,
                                       mirroring, device)
        expected = description.channel_names
        if expected and len(expected) != len(volumeNodes):
            raise ValueError(f"the model expects {len(expected)} channel(s) ({', '.join(expected)}), got {len(volumeNodes)}")
        for volumeNode in volumeNodes:
            if volumeNode.GetParentTransformNode() is not None:
                raise ValueError(f"'{volumeNode.GetName()}' is under a transform; harden the transform first")
        inputs = [scenelogic.volume_from_node(v) for v in volumeNodes]
        job, context = modulejobs.start_prediction(
            workDir, modelDir, inputs, largest_component=largestComponent, reference_volume=volumeNodes[0],
            output_segmentation=outputSegmentation, classes=description.classes, show_3d=show3d,
            looks=prediction_looks(description.classes, description.dataset_json), **choice.params_fields())
        return self.board.add("predict", job, context)

    def loadPrediction(self, entry):
        """The finished prediction as named, colored segments (with the training segments' terminology)
        on its input's geometry."""
        context = entry.context
        if context.reference_volume is None:
            raise ValueError("the input volume of this prediction is no longer in the scene")
        return scenelogic.load_label_file(context.output_file, context.reference_volume, context.classes,
                                          context.output_segmentation, show_3d=context.show_3d,
                                          looks=context.looks or None)

    # -- results ---------------------------------------------------------------------------------

    @staticmethod
    def trialRows(root: Path) -> list:
        """Rows of the trials table from a search's ``results.json`` (empty before the first trial)."""
        from AutoNNUNetLib.search import results

        return results.trial_rows_from_results(results.read_results(root), root)

    @staticmethod
    def trialPoints(rows: list) -> list:
        from AutoNNUNetLib.progress import TrialPoint, trial_state

        return [TrialPoint(trial=r.trial, epochs=r.epochs, state=trial_state(r.state), dice=r.dice,
                           train_seconds=r.train_seconds) for r in rows]

    @staticmethod
    def incumbentModelDir(root: Path) -> Optional[Path]:
        from AutoNNUNetLib.search import results

        return results.incumbent_model_dir(root, results.read_results(root))
