"""Writing a validated source as an nnU-Net v2 raw dataset, all or nothing.

The dataset is assembled in a hidden temporary folder beside the target (hidden, so nnU-Net's
and the workspace's ``Dataset*`` globs never see it) and renamed into place; an existing dataset
is set aside first and restored if the rename fails. A failure at any point leaves the workspace
as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from ..files import atomic_write_json
from ..imaging import GEOMETRY_TOLERANCE
from ..workspace import Workspace, dataset_folder_name
from .classes import ORIGINAL_LABELS_KEY, original_labels_entry
from .headers import FileCache, array_of, load_image, sitk_reason
from .records import FILE_ENDING, ChannelFile, DatasetError, DatasetSource, PathLike, Problem
from .validate import CasePlan, ProgressCallback, emit, validate

logger = logging.getLogger(__name__)


def label_dtype(max_value: int) -> np.dtype:
    """The smallest integer type nnU-Net handles for this many classes: uint8, int16 or int32."""
    if max_value <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if max_value <= np.iinfo(np.int16).max:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def write_case(plan: CasePlan, images_dir: Path, labels_dir: Path, dtype: np.dtype) -> None:
    """Write one case's channel files and its label map (values mapped to the class table)."""
    case = plan.case
    cache = FileCache()
    for i, (spec, header) in enumerate(zip(case.channels, plan.headers)):
        target = images_dir / f"{case.case_id}_{i:04d}{FILE_ENDING}"
        same_file_kind = isinstance(spec, Path) and header.plain and spec.name.lower().endswith(FILE_ENDING)
        if same_file_kind and header.geometry == plan.reference:
            # Already what nnU-Net wants: copy the bytes, the most faithful (and fastest) "write".
            shutil.copyfile(spec, target)
            continue
        image = load_image(spec, cache)
        # Within tolerance is not identical: put every file of the case exactly on channel 0's grid,
        # as nnU-Net's own integrity check compares grids without tolerance.
        plan.reference.apply_to(image)
        sitk.WriteImage(image, str(target), True)
        if not isinstance(spec, ChannelFile):
            cache.clear()
    cache.clear()

    array = np.asarray(array_of(case.label, cache))
    out = np.zeros(array.shape, dtype=dtype)
    for value, target_value in plan.value_map.items():
        if target_value != 0:
            out[array == value] = target_value
    del array
    cache.clear()
    image = sitk.GetImageFromArray(out)
    plan.reference.apply_to(image)
    sitk.WriteImage(image, str(labels_dir / f"{case.case_id}{FILE_ENDING}"), True)


def _existing_with_id(workspace: Workspace, dataset_id: int, folder_name: str) -> list[Path]:
    """Other datasets with the same number: nnU-Net resolves ``-d N`` by number and fails on two."""
    prefix = f"Dataset{dataset_id:03d}_"
    found = []
    for tree in (workspace.raw, workspace.preprocessed, workspace.results):
        if tree.is_dir():
            found += [p for p in tree.glob(prefix + "*") if p.is_dir() and p.name != folder_name]
    return found


def build_dataset(
    source: DatasetSource,
    workspace: Union[Workspace, PathLike],
    dataset_id: int = 1,
    name: str = "AutoNNUNet",
    overwrite: bool = False,
    progress: Optional[ProgressCallback] = None,
    *,
    tolerance: float = GEOMETRY_TOLERANCE,
) -> Path:
    """Validate every case of ``source``, then write ``workspace.raw/DatasetNNN_Name``.

    Nothing is written until all cases pass; the dataset is assembled in a hidden temporary folder
    beside the target and renamed into place, so on any error the workspace is as it was (an
    existing dataset included). Sets ``workspace.dataset_name``. Returns the dataset folder.

    Raises:
        DatasetError: with every problem found, each naming its case; or when the target exists
            and ``overwrite`` is False; or when another dataset already uses ``dataset_id``.
    """
    if not isinstance(workspace, Workspace):
        workspace = Workspace(Path(workspace))
    try:
        folder_name = dataset_folder_name(dataset_id, name)
    except Exception as error:  # WorkspaceError: id out of range
        raise DatasetError(str(error)) from None
    target = workspace.raw / folder_name
    if target.exists() and not overwrite:
        raise DatasetError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    clashes = _existing_with_id(workspace, dataset_id, folder_name)
    if clashes:
        raise DatasetError(
            f"dataset id {dataset_id} is already used by {', '.join(str(p) for p in clashes)}; choose another id"
        )

    emit(progress, 0.0, f"checking {len(source.cases)} cases")
    validated = validate(source, tolerance, progress, 0.5)
    dtype = label_dtype(max(validated.classes.values()))

    workspace.raw.mkdir(parents=True, exist_ok=True)
    # Hidden (leading dot) so nnU-Net's and Workspace's "Dataset*" globs never see it.
    temp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.tmp-", dir=workspace.raw))
    try:
        images_dir, labels_dir = temp / "imagesTr", temp / "labelsTr"
        images_dir.mkdir()
        labels_dir.mkdir()
        for index, plan in enumerate(validated.plans):
            try:
                write_case(plan, images_dir, labels_dir, dtype)
            except (DatasetError, RuntimeError, OSError) as error:
                # A file changed or vanished since validation, or the disk is full.
                reason = sitk_reason(error) if isinstance(error, RuntimeError) else str(error)
                raise DatasetError(Problem(plan.case.case_id, f"writing failed: {reason}")) from error
            emit(progress, 0.5 + 0.5 * (index + 1) / len(validated.plans), f"wrote {plan.case.case_id}")
        dataset_json = {
            "name": name,
            "description": source.description or f"Built by AutoNNUNet from {len(validated.plans)} labeled cases",
            "channel_names": {str(i): n for i, n in enumerate(validated.channel_names)},
            "labels": validated.classes,
            "numTraining": len(validated.plans),
            "file_ending": FILE_ENDING,
        }
        if validated.original_labels:
            # Extra keys are ignored by nnU-Net, which copies the file into every model it trains.
            dataset_json[ORIGINAL_LABELS_KEY] = original_labels_entry(validated.original_labels)
        atomic_write_json(temp / "dataset.json", dataset_json)
        _move_into_place(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if (workspace.preprocessed / folder_name).exists():
        logger.warning("%s was rebuilt: its preprocessed data is stale until fingerprinting runs again", folder_name)
    workspace.dataset_name = folder_name
    emit(progress, 1.0, f"dataset {folder_name} ready ({len(validated.plans)} cases)")
    return target


def _move_into_place(temp: Path, target: Path) -> None:
    """Rename ``temp`` to ``target``; an existing target is set aside first and restored on failure."""
    if not target.exists():
        os.rename(temp, target)
        return
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, backup)
    try:
        os.rename(temp, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
