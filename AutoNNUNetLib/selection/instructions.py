"""nnU-Net's own selection files, and the stock commands that reproduce a selection.

``nnUNetv2_find_best_configuration`` leaves ``inference_information.json`` (the chosen models,
folds, cross-validation Dice before and after postprocessing, the ``postprocessing.pkl`` path) and
``inference_instructions.txt`` (the commands) in ``nnUNet_results/<dataset>/``. We write the same
files with the same keys. :func:`stock_commands` builds the commands as argument lists; the text
file is made from it and the tests run it, so the instructions are the commands that were checked.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional, Sequence

from ..files import atomic_write_json, atomic_write_text
from ..workspace import STOCK_TRAINER
from .layout import INFORMATION_FILE, INSTRUCTIONS_FILE

#: nnU-Net's default worker count in its printed commands.
DEFAULT_PROCESSES = 8


def stock_commands(dataset: str, members: Sequence[dict], folds: Sequence[int], postprocessing_pkl: Optional[Path],
                   plans_json: Path, use_mirroring: bool, input_folder: str = "INPUT_FOLDER",
                   output_folder: str = "OUTPUT_FOLDER", device: Optional[str] = None,
                   processes: int = DEFAULT_PROCESSES) -> list[list[str]]:
    """The stock commands (argument lists) that predict ``input_folder`` with the selection.

    ``members`` are dicts with ``configuration`` and ``plans_identifier``. When
    ``postprocessing_pkl`` is given the final result is in ``<output_folder>_PP``.
    """
    ensemble = len(members) > 1
    outputs = [f"{output_folder}_MODEL_{i + 1}" if ensemble else output_folder for i in range(len(members))]
    commands = []
    for member, out in zip(members, outputs):
        argv = ["nnUNetv2_predict", "-d", dataset, "-i", input_folder, "-o", out, "-f", *map(str, folds),
                "-tr", STOCK_TRAINER, "-c", member["configuration"], "-p", member["plans_identifier"]]
        if ensemble:
            argv.append("--save_probabilities")
        if not use_mirroring:
            argv.append("--disable_tta")
        if device:
            argv += ["-device", device]
        if device == "cpu":
            argv += ["-npp", "1", "-nps", "1"]
        commands.append(argv)
    if ensemble:
        commands.append(["nnUNetv2_ensemble", "-i", *outputs, "-o", output_folder, "-np", str(processes)])
    if postprocessing_pkl is not None:
        commands.append(["nnUNetv2_apply_postprocessing", "-i", output_folder, "-o", f"{output_folder}_PP",
                         "-pp_pkl_file", str(postprocessing_pkl), "-np", str(processes), "-plans_json", str(plans_json)])
    return commands


def write_inference_files(results: Path, dataset: str, members: Sequence[dict], folds: Sequence[int],
                          considered: Sequence[dict], all_results: dict[str, float], dice_before: float,
                          dice_after: float, postprocessing_pkl: Path, plans_json: Path, use_mirroring: bool) -> None:
    """``inference_information.json`` and ``inference_instructions.txt`` in ``results`` (nnU-Net's keys)."""
    selected = [{"configuration": m["configuration"], "trainer": STOCK_TRAINER,
                 "plans_identifier": m["plans_identifier"]} for m in members]
    atomic_write_json(results / INFORMATION_FILE, {
        "folds": list(folds),
        "dataset_name_or_id": dataset,
        "considered_models": [{"plans": c["plans_identifier"], "configuration": c["configuration"],
                               "trainer": STOCK_TRAINER} for c in considered],
        "ensembling_allowed": True,
        "all_results": all_results,
        "best_model_or_ensemble": {
            "result_on_crossval_pre_pp": dice_before,
            "result_on_crossval_post_pp": dice_after,
            "postprocessing_file": str(postprocessing_pkl),
            "some_plans_file": str(plans_json),
            "selected_model_or_models": selected,
        },
        "use_mirroring": use_mirroring,
    })
    commands = stock_commands(dataset, members, folds, postprocessing_pkl, plans_json, use_mirroring)
    lines = ["***Run inference like this:***", "",
             f"export nnUNet_results={shlex.quote(str(results.parent))}", ""]
    if len(members) > 1:
        lines.append("An ensemble won. Predict with each member (keeping the probabilities), then ensemble:")
        lines.append("")
    for argv in commands:
        if argv[0] == "nnUNetv2_apply_postprocessing":
            lines += ["", "***Once inference is completed, run postprocessing like this:***", ""]
        lines.append(shlex.join(argv))
    lines += ["", "Add `-device cpu` to nnUNetv2_predict without a GPU. The result is OUTPUT_FOLDER_PP.", ""]
    atomic_write_text(results / INSTRUCTIONS_FILE, "\n".join(lines))
