"""Writing a validated source as an nnU-Net v2 raw dataset, all or nothing.

The dataset is assembled in a hidden temporary folder beside the target (hidden, so nnU-Net's
and the workspace's ``Dataset*`` globs never see it) and renamed into place; an existing dataset
is set aside first and restored if the rename fails. A failure at any point leaves the workspace
as it was.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from ..files import atomic_write_json
from ..imaging import GEOMETRY_TOLERANCE
from ..processes import pid_alive
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
    blocking = next((p for p in (workspace.root, workspace.raw) if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # found before validation, not after it
        raise DatasetError(f"workspace {workspace.root}: {blocking} is a file, not a folder")
    if workspace.raw.is_dir():
        clean_stale_builds(workspace.raw)  # first: it may put back a dataset a killed build set aside
    if target.exists() and not overwrite:
        raise DatasetError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    clashes = _existing_with_id(workspace, dataset_id, folder_name)
    if clashes:
        raise DatasetError(
            f"dataset id {dataset_id} is already used by {', '.join(str(p) for p in clashes)}; choose another id"
        )

    emit(progress, 0.0, f"checking {len(source.cases)} cases")
    validated = validate(source, tolerance, progress, 0.5)
    for warning in validated.warnings:
        logger.warning("%s", warning)
        emit(progress, 0.5, f"warning: {warning}")
    dtype = label_dtype(max(validated.classes.values()))

    try:
        workspace.raw.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DatasetError(f"cannot create {workspace.raw}: {error.strerror or error}") from None
    # Hidden (leading dot) so nnU-Net's and Workspace's "Dataset*" globs never see it; the owner's
    # host and pid in the name tell a later build whether it is stale.
    temp = Path(tempfile.mkdtemp(prefix=f".{folder_name}{_TEMP_MARK}{_owner()}-", dir=workspace.raw))
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


_TEMP_MARK = ".tmp-"
_BACKUP_MARK = ".old-"
#: A hidden build folder without a readable owner (or of another host) is stale after this long.
STALE_AFTER_SECONDS = 6 * 3600
_HIDDEN_BUILD_RE = re.compile(r"^\.(Dataset\d{3}_[A-Za-z0-9_\-]+)(\.tmp-|\.old-)(?:([^-]+)-(\d+)-)?")


def _owner() -> str:
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}"


def _is_stale(match: re.Match, path: Path) -> bool:
    host, pid = match.group(3), match.group(4)
    if host is not None and host == _owner().rsplit("-", 1)[0]:
        return int(pid) != os.getpid() and not pid_alive(int(pid))
    try:
        return time.time() - path.stat().st_mtime > STALE_AFTER_SECONDS
    except OSError:
        return False


def clean_stale_builds(raw: Path) -> list[Path]:
    """Remove what killed builds left in ``raw``: hidden temporary folders and set-aside datasets.

    A build killed while writing leaves ``.DatasetNNN_Name.tmp-...``; one killed between its two
    renames leaves the previous dataset as ``.DatasetNNN_Name.old-...``, which is put back when
    the dataset itself is missing (else removed). Folders of a build still running (its process
    alive) are left alone. Returns the paths removed or restored.
    """
    handled = []
    for path in sorted(raw.glob(".Dataset*")):
        match = _HIDDEN_BUILD_RE.match(path.name)
        if match is None or not path.is_dir() or not _is_stale(match, path):
            continue
        target = raw / match.group(1)
        if match.group(2) == _BACKUP_MARK and not target.exists():
            logger.warning("restoring %s from %s, left by an interrupted build", target.name, path.name)
            os.rename(path, target)
        else:
            logger.info("removing %s, left by an interrupted build", path.name)
            shutil.rmtree(path, ignore_errors=True)
        handled.append(path)
    return handled


def _move_into_place(temp: Path, target: Path) -> None:
    """Rename ``temp`` to ``target``; an existing target is set aside first and restored on failure."""
    if not target.exists():
        os.rename(temp, target)
        return
    backup = target.with_name(f".{target.name}{_BACKUP_MARK}{_owner()}-{uuid.uuid4().hex[:8]}")
    os.rename(target, backup)
    try:
        os.rename(temp, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
