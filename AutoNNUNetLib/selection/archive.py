"""A whole selection as one zip: ``export-model`` on a selection root, ``import-model`` back.

The archive mirrors the selection root, limited to what predicting needs::

    selection.json                                  the decision (members, folds, TTA, postprocessing)
    nnUNet_results/DatasetNNN_Name/
        <member model folder>/plans.json dataset.json ... fold_K/checkpoint_final.pth
        <postprocessing folder>/postprocessing.pkl postprocessing.json plans.json dataset.json
        inference_information.json inference_instructions.txt

Left out: the other candidates, the cross-validation probabilities (``fold_K/validation``),
``finalize.json`` (it names the exporting machine's workspace): an imported selection predicts
(:class:`~AutoNNUNetLib.selection.predictor.Selection`, stock nnU-Net), it is not re-selected.

Importing trusts nothing in the archive beyond what it checks: the model zip's one extraction
rule (:mod:`AutoNNUNetLib.archives`: names stay inside, no links, size limits), only the files
``selection.json`` names are extracted (each member's model files and checkpoints of the
selection's folds, checked as :func:`~AutoNNUNetLib.model.inspect_model` checks them), and
``postprocessing.pkl`` is never taken from the archive (a pickle runs code when loaded): it is
written again from the JSON plan in ``selection.json``, and so are the inference files, whose
paths then name the new place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Union

from .layout import (INFORMATION_FILE, INSTRUCTIONS_FILE, POSTPROCESSING_JSON, POSTPROCESSING_PKL, RESULTS_DIR,
                     SELECTION_RECORD)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
#: The selection record's name inside the archive (at its top).
SELECTION_MEMBER = SELECTION_RECORD
#: Files of the postprocessing folder that travel (the pickle is written again on import).
POSTPROCESSING_FILES = (POSTPROCESSING_PKL, POSTPROCESSING_JSON, "plans.json", "dataset.json")
#: The largest selection.json read from an archive before extracting (a record, not data).
MAX_RECORD_BYTES = 16 << 20
_FOLDER_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def is_selection_root(path: PathLike) -> bool:
    """Whether ``path`` is a selection root that ``autonnunet select`` has written."""
    return (Path(path) / SELECTION_RECORD).is_file()


def is_selection_archive(path: PathLike) -> bool:
    """Whether ``path`` is a zip holding a selection (``selection.json`` at its top)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return SELECTION_MEMBER in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _posix(relative: str) -> PurePosixPath:
    return PurePosixPath(Path(relative).as_posix())


def export_selection(root: PathLike, zip_path: PathLike) -> Path:
    """Write the selection at ``root`` (its members, postprocessing and inference files) to
    ``zip_path`` plus ``<zip_path>.sha256``. Every member is checked first as a model export is
    (:func:`~AutoNNUNetLib.model.inspect_model`), so an archive stock tools could not load is
    never written. Returns the zip path."""
    from ..model import inspect_model, model_members, write_reproducible_zip
    from .choose import SelectionResult
    from .layout import SelectionError, dataset_results

    root = Path(root)
    result = SelectionResult.load(root)
    files: list[tuple[str, Path]] = [(SELECTION_MEMBER, root / SELECTION_RECORD)]
    for member in result.members:
        model_dir = root / member["model_dir"]
        info = inspect_model(model_dir, folds=result.folds)
        files += model_members(model_dir, _posix(member["model_dir"]), info.folds)
    postprocessing = root / result.postprocessing_file
    if not postprocessing.is_file():
        raise SelectionError(f"{postprocessing}: missing; run `autonnunet select {root}` again")
    folder = _posix(result.postprocessing_file).parent
    files += [(str(folder / name), postprocessing.parent / name) for name in POSTPROCESSING_FILES
              if (postprocessing.parent / name).is_file()]
    results = dataset_results(root, result.dataset)
    prefix = PurePosixPath(RESULTS_DIR, result.dataset)
    files += [(str(prefix / name), results / name) for name in (INFORMATION_FILE, INSTRUCTIONS_FILE)
              if (results / name).is_file()]
    write_reproducible_zip(files, zip_path)
    logger.info("exported the selection %s (%s) to %s", root, " + ".join(m["name"] for m in result.members), zip_path)
    return Path(zip_path)


def _read_record(zip_path: Path) -> dict[str, Any]:
    from ..model import ModelError

    with zipfile.ZipFile(zip_path) as archive:
        info = archive.getinfo(SELECTION_MEMBER)
        if info.file_size > MAX_RECORD_BYTES:
            raise ModelError(f"{zip_path}: {SELECTION_MEMBER} is {info.file_size} bytes; not a selection record")
        try:
            with archive.open(info) as stream:
                record = json.loads(stream.read(MAX_RECORD_BYTES + 1).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, zipfile.BadZipFile) as error:
            raise ModelError(f"{zip_path}: {SELECTION_MEMBER} is not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise ModelError(f"{zip_path}: {SELECTION_MEMBER} is not a JSON object")
    return record


def _expected_files(zip_path: Path, record: dict[str, Any]) -> tuple[set[PurePosixPath], list[PurePosixPath],
                                                                      PurePosixPath, list[int]]:
    """The archive members a selection may hold (from its record, each name checked), the member
    model folders, the postprocessing folder and the folds."""
    from ..archives import ArchiveError, check_member_name
    from ..model import CHECKPOINT_NAME, MODEL_FILES, ModelError
    from ..workspace import DATASET_NAME_RE

    def bad(problem: str) -> ModelError:
        return ModelError(f"{zip_path}: {SELECTION_MEMBER}: {problem}; not a selection written by export-model")

    dataset = record.get("dataset")
    if not isinstance(dataset, str) or not DATASET_NAME_RE.match(dataset):
        raise bad(f"dataset {dataset!r} is not of nnU-Net's form DatasetNNN_Name")
    folds = record.get("folds")
    if not isinstance(folds, list) or not folds or not all(isinstance(f, int) and not isinstance(f, bool)
                                                           and 0 <= f <= 4 for f in folds):
        raise bad(f"folds {folds!r} are not fold numbers 0-4")
    prefix = PurePosixPath(RESULTS_DIR, dataset)

    def inside(name: Any, what: str) -> PurePosixPath:
        if not isinstance(name, str):
            raise bad(f"{what} {name!r} is not a path")
        try:
            path = check_member_name(_posix(name).as_posix())
        except ArchiveError as error:
            raise bad(f"{what}: {error}") from None
        if prefix not in path.parents or not all(_FOLDER_RE.match(part) for part in path.parts):
            raise bad(f"{what} {name!r} is not inside {prefix}")
        return path

    members = record.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        raise bad("no members")
    model_dirs = [inside(m.get("model_dir"), "member model folder") for m in members]
    if any(d.parent != prefix for d in model_dirs):
        raise bad(f"member model folders must sit in {prefix}")
    pp_folder = inside(record.get("postprocessing_file"), "postprocessing file").parent
    allowed = {PurePosixPath(SELECTION_MEMBER), prefix / INFORMATION_FILE}
    for model_dir in model_dirs:
        allowed |= {model_dir / name for name in MODEL_FILES}
        allowed |= {model_dir / f"fold_{fold}" / CHECKPOINT_NAME for fold in folds}
    # Not the pickle: it is written again from the plan (see the module's docstring).
    allowed |= {pp_folder / name for name in POSTPROCESSING_FILES if name != POSTPROCESSING_PKL}
    return allowed, model_dirs, pp_folder, folds


def _considered(information: Optional[dict], members: list[dict]) -> list[dict]:
    """The models nnU-Net's information file lists as considered (the exporter's candidates)."""
    listed = (information or {}).get("considered_models")
    if isinstance(listed, list) and all(isinstance(c, dict) and isinstance(c.get("plans"), str)
                                        and isinstance(c.get("configuration"), str) for c in listed):
        return [{"plans_identifier": c["plans"], "configuration": c["configuration"]} for c in listed]
    return [{"plans_identifier": m["plans_identifier"], "configuration": m["configuration"]} for m in members]


def import_selection(zip_path: PathLike, dest: PathLike, overwrite: bool = False, trust_checkpoint: bool = False,
                     check_checkpoints: bool = True, max_ratio: Optional[float] = None,
                     min_free_bytes: Optional[int] = None) -> Path:
    """Check and extract a selection archive; ``dest`` becomes the selection root (returned).

    ``dest`` must not exist or be empty (``overwrite`` replaces it once everything checked out).
    Nothing is left behind on failure: extraction goes to a temporary folder beside ``dest``.
    """
    from ..archives import DEFAULT_MAX_RATIO, DEFAULT_MIN_FREE_BYTES, ArchiveError, Member, safe_extract
    from ..files import read_json
    from ..model import ModelError, check_sidecar, inspect_model
    from .choose import SelectionResult
    from .instructions import write_inference_files

    zip_path, dest = Path(zip_path), Path(dest)
    if not zip_path.is_file():
        raise ModelError(f"{zip_path}: no such file")
    check_sidecar(zip_path)
    if not is_selection_archive(zip_path):
        raise ModelError(f"{zip_path}: no {SELECTION_MEMBER} inside; not a selection archive")
    if dest.exists() and not dest.is_dir():
        raise ModelError(f"{dest}: exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise ModelError(f"{dest}: not empty (pass overwrite=True / --overwrite to replace a selection there)")
        if not is_selection_root(dest):  # --overwrite replaces a selection, never any other folder
            raise ModelError(f"{dest}: not empty and not a selection root; give an empty or new folder")
    record = _read_record(zip_path)
    allowed, model_dirs, pp_folder, folds = _expected_files(zip_path, record)

    def target(member: Member) -> Optional[PurePosixPath]:
        return member.path if not member.is_dir and member.path in allowed else None

    final = dest.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=final.parent))
    try:
        extracted = staging / "selection"
        try:
            safe_extract(zip_path, extracted, target=target,
                         max_ratio=DEFAULT_MAX_RATIO if max_ratio is None else max_ratio,
                         min_free_bytes=DEFAULT_MIN_FREE_BYTES if min_free_bytes is None else min_free_bytes)
        except ArchiveError as error:
            raise ModelError(f"{zip_path}: {error}") from None
        for model_dir in model_dirs:
            try:
                inspect_model(extracted / Path(*model_dir.parts), folds=folds, trust_checkpoint=trust_checkpoint,
                              check_checkpoints=check_checkpoints)
            except ModelError as error:
                raise ModelError(str(error).replace(str(extracted), str(zip_path) + ":")) from None
        try:
            result = SelectionResult.load(extracted)
        except (KeyError, TypeError, ValueError) as error:
            raise ModelError(f"{zip_path}: {SELECTION_MEMBER} is incomplete ({type(error).__name__}: {error})") from None
        # Our own pickle and inference files, naming the place the selection lands in.
        postprocessing = extracted / Path(*pp_folder.parts)
        for name in ("plans.json", "dataset.json"):
            if not (postprocessing / name).is_file():
                shutil.copy2(extracted / Path(*model_dirs[0].parts) / name, postprocessing / name)
        result.postprocessing.write(postprocessing)
        considered = _considered(read_json(extracted / RESULTS_DIR / result.dataset / INFORMATION_FILE), result.members)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(extracted, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # Written in place: their paths and the `export nnUNet_results` line name where it landed.
    final_pp = final / Path(*pp_folder.parts)
    write_inference_files(final / RESULTS_DIR / result.dataset, result.dataset, result.members, result.folds,
                          considered, {s.key: s.score.foreground_mean for s in result.scores},
                          result.postprocessing.dice_before, result.postprocessing.dice_after,
                          final_pp / POSTPROCESSING_PKL, final_pp / "plans.json", result.use_mirroring)
    logger.info("imported the selection %s to %s", zip_path, final)
    return final
