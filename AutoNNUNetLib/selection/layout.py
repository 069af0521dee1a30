"""Where a selection lives on disk, and its error class.

A selection root is a small nnU-Net results tree plus our two records::

    ROOT/
      finalize.json                 what was asked (candidates, F, folds) and what each fold did
      selection.json                the decision (members, folds, TTA, postprocessing, all scores)
      nnUNet_results/DatasetNNN_Name/
        nnUNetTrainer__nnUNetPlans_<candidate>__<configuration>/   one model folder per candidate
          plans.json dataset.json fold_K/checkpoint_final.pth
          fold_K/validation/<case>.npz|.pkl|.nii.gz               cross-validation probabilities
        ensembles/ensemble___<m1>___<m2>___0_1_2_3_4/            when an ensemble wins
        inference_information.json inference_instructions.txt     nnU-Net's own selection files

Pointing ``nnUNet_results`` at ``ROOT/nnUNet_results`` is all stock nnU-Net needs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from ..errors import AutoNNUNetError

FINALIZE_RECORD = "finalize.json"
SELECTION_RECORD = "selection.json"
RESULTS_DIR = "nnUNet_results"
VALIDATION_DIR = "validation"
#: Written last into fold_K/validation: the fold's cross-validation predictions are complete.
CV_MARKER = "autonnunet_cv.json"
INFORMATION_FILE = "inference_information.json"
INSTRUCTIONS_FILE = "inference_instructions.txt"
POSTPROCESSING_PKL = "postprocessing.pkl"
POSTPROCESSING_JSON = "postprocessing.json"
#: Candidate names become part of nnU-Net plans identifiers, which nnU-Net splits at "__".
NAME_RE = re.compile(r"^[A-Za-z0-9]+$")


class SelectionError(AutoNNUNetError, ValueError):
    """Finalizing or selecting cannot go on; the message names the folder or candidate."""


def dataset_results(root: Path, dataset_name: str) -> Path:
    return Path(root) / RESULTS_DIR / dataset_name


def folds_string(folds: Sequence[int]) -> str:
    """nnU-Net's spelling of a fold tuple in folder names: (0, 1, 2) -> ``0_1_2``."""
    return "_".join(str(f) for f in folds)


def crossval_folder(model_dir: Path, folds: Sequence[int]) -> Path:
    """nnU-Net's merged cross-validation folder of a model (where it keeps postprocessing.pkl)."""
    return Path(model_dir) / f"crossval_results_folds_{folds_string(folds)}"


def ensemble_folder(results: Path, folder_names: Sequence[str], folds: Sequence[int]) -> Path:
    """nnU-Net's ensemble folder name (``get_ensemble_name``) under ``<dataset>/ensembles``."""
    return Path(results) / "ensembles" / ("ensemble___" + "___".join(folder_names) + f"___{folds_string(folds)}")
