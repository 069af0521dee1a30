"""AutoNNUNetLib: find the best nnU-Net for your own labeled volumes.

The library behind the AutoNNUNet 3D Slicer extension, its ``autonnunet`` command and its remote
runner. It never imports slicer, qt, vtk or ctk, so everything here runs headless and is tested
without Slicer. The folders name the pipeline:

- ``dataset/``: labeled cases (files, MSD/nnU-Net folders, arrays) -> a validated nnU-Net raw dataset
- ``fingerprint``: nnU-Net's fingerprint, plans and preprocessing, with a readable summary
- ``config`` / ``network``: the trial configuration record and the network it builds
- ``trainer``: nnU-Net training with epoch budgets, resume and fast validation
- ``search/``: the (regularized) PriorBand search on NePS, its budget, results and report
- ``selection/``: after the search, nnU-Net's own model selection (folds, ensembles, postprocessing)
- ``model`` / ``inference`` / ``bounded/``: model folders, and prediction in bounded memory
- ``jobs/`` / ``remote/``: one Job protocol, run locally or on the remote runner
- ``cli``: the ``autonnunet`` command

The names below are the public surface; they load on first use, so ``import AutoNNUNetLib`` stays
cheap (the server and the Slicer module import parts of the library without torch).
"""

from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_PUBLIC = {
    "AutoNNUNetError": "AutoNNUNetLib.errors",
    "Workspace": "AutoNNUNetLib.workspace",
    "TrialConfig": "AutoNNUNetLib.config",
    "build_dataset": "AutoNNUNetLib.dataset",
    "plan_and_preprocess": "AutoNNUNetLib.fingerprint",
    "train": "AutoNNUNetLib.trainer",
    "SearchSettings": "AutoNNUNetLib.search.settings",
    "run_search": "AutoNNUNetLib.search",
    "Selection": "AutoNNUNetLib.selection",
    "Predictor": "AutoNNUNetLib.inference",
    "LocalJob": "AutoNNUNetLib.jobs.local",
    "RemoteJob": "AutoNNUNetLib.remote.job",
    "RemoteClient": "AutoNNUNetLib.remote.client",
}

__all__ = sorted(_PUBLIC)

__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
