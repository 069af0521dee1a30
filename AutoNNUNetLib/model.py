"""Model folders: nnU-Net's results layout, plus our record, as a portable zip.

A model folder is what ``nnUNetv2_train`` leaves in ``nnUNet_results``, so stock nnU-Net tools and
SlicerNNUnet load it without this package::

    nnUNetTrainer__nnUNetPlans__3d_fullres/
        plans.json                   the plans, architecture entry = the network actually trained
        dataset.json                 channels, labels, file ending
        dataset_fingerprint.json     what the planner saw (optional for inference)
        fold_0/checkpoint_final.pth  weights; ``trainer_name`` is a stock nnU-Net trainer
        autonnunet.json              our record: configuration, scores, training time (optional)

The zip written by :func:`export_model` holds these files under ``DatasetNNN_Name/<model folder>/``,
the layout of ``nnUNetv2_export_model_to_zip``, so ``nnUNetv2_install_pretrained_model_from_zip``
installs it as well. Only what inference and the record need goes in (no ``checkpoint_best``,
logs or plots), members are sorted and time-stamped identically, so exporting the same folder twice
gives the same bytes; a ``<zip>.sha256`` sidecar in ``sha256sum`` format goes next to it.

:func:`import_model` refuses archives that could write outside the destination (absolute paths,
``..``, links), that lack a required file, or whose checkpoint stock nnU-Net could not load, and
only then moves the extracted folder into place.

A selection root (``autonnunet select``: members, folds, postprocessing) goes through the same
verbs as one zip: :mod:`AutoNNUNetLib.selection.archive`, with the writer and checks of this module.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Optional, Sequence, Union

from .archives import DEFAULT_MAX_RATIO, DEFAULT_MIN_FREE_BYTES, ArchiveError, Member, inspect_archive, safe_extract
from .errors import AutoNNUNetError
from .files import sha256_file
from .workspace import DATASET_NAME_RE, PLANS_NAME, STOCK_TRAINER

logger = logging.getLogger(__name__)

RECORD_NAME = "autonnunet.json"
CHECKPOINT_NAME = "checkpoint_final.pth"
#: Files at the top of a model folder that an export carries (when present); the first two are required.
MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json", RECORD_NAME)
REQUIRED_FILES = ("plans.json", "dataset.json")
#: Fixed member time stamp (the zip epoch) so that archives are byte-for-byte reproducible.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_FOLD_RE = re.compile(r"^fold_(\d+|all)$")

PathLike = Union[str, os.PathLike]


class ModelError(AutoNNUNetError, ValueError):
    """A model folder or archive is unusable; the message names the file and the problem."""


@dataclass
class ModelInfo:
    """What :func:`inspect_model` found in a model folder."""

    model_dir: Path
    dataset_name: str
    plans_name: str
    configuration: str
    trainer_name: str
    folds: list[Union[int, str]] = field(default_factory=list)
    channel_names: list[str] = field(default_factory=list)  # in the model's channel order
    labels: dict[str, Any] = field(default_factory=dict)    # dataset.json's class name -> value
    file_ending: str = ".nii.gz"
    record: dict = field(default_factory=dict)              # autonnunet.json ({} for stock models)
    #: Whether the checkpoints were opened and checked (False: read from the JSON files only).
    checkpoints_checked: bool = False

    @property
    def folder_name(self) -> str:
        """The folder name nnU-Net expects: ``<trainer>__<plans>__<configuration>``."""
        return f"{self.trainer_name}__{self.plans_name}__{self.configuration}"


def load_record(model_dir: PathLike) -> dict:
    """Our JSON record of a model folder (configuration, scores, times); ``{}`` if it has none.

    A model trained by stock nnU-Net has no record and is still a valid model.
    """
    path = Path(model_dir) / RECORD_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelError(f"{path}: not valid JSON ({error})") from error


def available_folds(model_dir: PathLike, checkpoint: str = CHECKPOINT_NAME) -> list[Union[int, str]]:
    """Folds of a model folder that hold ``checkpoint``, numeric folds first (sorted), then ``all``."""
    found: list[Union[int, str]] = []
    for child in Path(model_dir).iterdir() if Path(model_dir).is_dir() else []:
        match = _FOLD_RE.match(child.name)
        if match and (child / checkpoint).is_file():
            found.append("all" if match.group(1) == "all" else int(match.group(1)))
    return sorted(found, key=lambda f: (isinstance(f, str), f if isinstance(f, int) else 0))


# --------------------------------------------------------------------------------------------------
# Validation


def _read_json_file(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"{path}: missing (a model folder needs {', '.join(REQUIRED_FILES)})")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return document


def _requested_folds(model_dir: Path, folds: Optional[Sequence[Union[int, str]]],
                     checkpoint: str) -> list[Union[int, str]]:
    present = available_folds(model_dir, checkpoint)
    if folds is None:
        if not present:
            raise ModelError(f"{model_dir}: no fold_N/{checkpoint} (the trained weights are missing)")
        return present
    wanted = [f if f == "all" else int(f) for f in folds]
    for fold in wanted:
        if fold not in present:
            raise ModelError(f"{model_dir / f'fold_{fold}' / checkpoint}: missing")
    return wanted


def read_model_info(
    model_dir: PathLike,
    folds: Optional[Sequence[Union[int, str]]] = None,
    checkpoint: str = CHECKPOINT_NAME,
) -> ModelInfo:
    """Describe a model folder from its JSON files alone (no torch import, no checkpoint opened).

    What a remote-only user needs to show a model collected from the server (whose checkpoints the
    server has checked): dataset, configuration, channels, classes, folds, our record. The
    configuration and trainer come from the folder name ``<trainer>__<plans>__<configuration>``
    when it has that form, else from the record and the plans.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: not a folder")
    plans = _read_json_file(model_dir / "plans.json")
    dataset = _read_json_file(model_dir / "dataset.json")
    if not isinstance(plans.get("configurations"), dict):
        raise ModelError(f"{model_dir / 'plans.json'}: no 'configurations' entry; not an nnU-Net plans file")
    record = load_record(model_dir)
    parts = model_dir.name.split("__")
    trainer_name, configuration = STOCK_TRAINER, str(record.get("configuration") or "")
    if len(parts) == 3 and parts[2] in plans["configurations"]:
        trainer_name, configuration = parts[0], parts[2]
    if configuration not in plans["configurations"]:
        configuration = "3d_fullres" if "3d_fullres" in plans["configurations"] else next(iter(plans["configurations"]))
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    try:
        channel_names = [str(channels[k]) for k in sorted(channels, key=lambda key: int(key))]
    except (TypeError, ValueError):
        raise ModelError(f"{model_dir / 'dataset.json'}: channel_names must map channel numbers to names") from None
    return ModelInfo(
        model_dir=model_dir,
        dataset_name=str(plans.get("dataset_name", "")),
        plans_name=str(plans.get("plans_name", PLANS_NAME)),
        configuration=configuration,
        trainer_name=trainer_name,
        folds=_requested_folds(model_dir, folds, checkpoint),
        channel_names=channel_names,
        labels=dict(dataset.get("labels") or {}),
        file_ending=str(dataset.get("file_ending", ".nii.gz")),
        record=record,
    )


def inspect_model(
    model_dir: PathLike,
    folds: Optional[Sequence[Union[int, str]]] = None,
    checkpoint: str = CHECKPOINT_NAME,
    trust_checkpoint: bool = False,
    check_checkpoints: bool = True,
) -> ModelInfo:
    """Check that a model folder is complete and loadable by stock nnU-Net; describe it.

    Checks: ``plans.json`` and ``dataset.json`` are present and valid JSON; each requested fold
    (default: all present, at least one) has ``checkpoint``; each checkpoint holds network weights,
    names a trainer class that ships with nnU-Net (a custom name would need the trainer's code on
    the user's machine) and a configuration the plans contain. With ``check_checkpoints=False``
    only the JSON files are read (:func:`read_model_info`; no torch needed).

    Checkpoints are opened with ``torch.load(weights_only=True)`` (tensors, numbers, strings and
    numpy scalars only), so inspecting an archive from elsewhere cannot run code. Pass
    ``trust_checkpoint=True`` for checkpoints that legitimately hold other objects.
    """
    info = read_model_info(model_dir, folds, checkpoint)
    if not check_checkpoints:
        return info
    model_dir = info.model_dir
    plans = _read_json_file(model_dir / "plans.json")
    configuration = trainer_name = None
    for fold in info.folds:
        path = model_dir / f"fold_{fold}" / checkpoint
        content = _load_checkpoint(path, trust_checkpoint)
        if not isinstance(content, dict) or "network_weights" not in content:
            raise ModelError(f"{path}: no 'network_weights'; not an nnU-Net checkpoint")
        name = content.get("trainer_name")
        if not isinstance(name, str) or not is_stock_trainer(name):
            raise ModelError(
                f"{path}: trainer_name {name!r} is not a trainer that ships with nnU-Net, so stock "
                f"nnU-Net tools cannot rebuild the network (models must name {STOCK_TRAINER!r})"
            )
        config_name = (content.get("init_args") or {}).get("configuration")
        if config_name not in plans["configurations"]:
            raise ModelError(
                f"{path}: configuration {config_name!r} is not in plans.json "
                f"({', '.join(plans['configurations'])})"
            )
        if configuration is not None and (config_name, name) != (configuration, trainer_name):
            raise ModelError(f"{path}: trained as {name}/{config_name}, other folds as {trainer_name}/{configuration}")
        configuration, trainer_name = config_name, name
    info.configuration, info.trainer_name = str(configuration), str(trainer_name)
    info.checkpoints_checked = True
    return info


def is_stock_trainer(name: str) -> bool:
    """Whether nnU-Net finds a trainer class of this name inside its own package.

    That is where ``nnUNetv2_predict`` looks (``nnUNet_extTrainer`` is opt-in), so only such
    names load everywhere. The common case is answered without importing nnU-Net's trainers.
    """
    if name == STOCK_TRAINER:
        return True
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return False
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    folder = os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer")
    try:
        return recursive_find_python_class(folder, name, "nnunetv2.training.nnUNetTrainer") is not None
    except Exception:  # a trainer module that fails to import is nnU-Net's problem, not a match
        return False


def _load_checkpoint(path: Path, trust: bool) -> Any:
    import numpy as np
    import torch

    if trust:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # garbage, a truncated file: torch raises many types
            raise ModelError(f"{path}: not a readable checkpoint, truncated or corrupt ({_last_line(error)})") from None
    # nnU-Net's logs in the checkpoint hold numpy scalars; allow those, and nothing executable.
    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [core.multiarray.scalar, np.dtype]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    # Checkpoints written under numpy 1.x name the scalar constructor by its old module path.
    allowed.append((core.multiarray.scalar, "numpy.core.multiarray.scalar"))
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if not zipfile.is_zipfile(path):  # torch writes zip files: this one is cut short or not one
            raise ModelError(f"{path}: not a readable checkpoint, truncated or corrupt ({_last_line(error)})") from None
        raise ModelError(
            f"{path}: cannot be read as a plain checkpoint ({_last_line(error)}); if you trust its source, "
            f"import it with trust_checkpoint=True / --trust-checkpoint"
        ) from None


def _last_line(error: Exception) -> str:
    """The informative line of a torch error (its messages are long and end with the reason)."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


# --------------------------------------------------------------------------------------------------
# Export


def export_model(
    model_dir: PathLike,
    zip_path: PathLike,
    folds: Optional[Sequence[Union[int, str]]] = None,
    checkpoint: str = CHECKPOINT_NAME,
) -> Path:
    """Write ``model_dir`` (the given folds, default all) to ``zip_path`` plus ``<zip_path>.sha256``.

    The folder is validated first (:func:`inspect_model`): an archive that stock tools could not
    load is never written. Returns the zip path.
    """
    model_dir = Path(model_dir)
    zip_path = Path(zip_path)
    info = inspect_model(model_dir, folds=folds, checkpoint=checkpoint)
    dataset_name = info.dataset_name if DATASET_NAME_RE.match(info.dataset_name) else "Dataset999_AutoNNUNet"
    prefix = PurePosixPath(dataset_name) / info.folder_name

    members = model_members(model_dir, prefix, info.folds, checkpoint)
    write_reproducible_zip(members, zip_path)
    logger.info("exported %s (folds %s) to %s", model_dir, info.folds, zip_path)
    return zip_path


def model_members(model_dir: Path, prefix: PurePosixPath, folds: Sequence[Union[int, str]],
                  checkpoint: str = CHECKPOINT_NAME) -> list[tuple[str, Path]]:
    """The (archive name, file) pairs an export carries for a checked model folder: its model
    files and each fold's checkpoint (stored as ``checkpoint_final.pth``)."""
    members = [(str(prefix / name), model_dir / name) for name in MODEL_FILES if (model_dir / name).is_file()]
    members += [(str(prefix / f"fold_{fold}" / CHECKPOINT_NAME), model_dir / f"fold_{fold}" / checkpoint)
                for fold in folds]
    return members


def write_reproducible_zip(members: Sequence[tuple[str, Path]], zip_path: PathLike) -> Path:
    """Write ``(archive name, file)`` pairs as a zip plus its ``<zip>.sha256`` sidecar.

    Members sorted, fixed time stamps and modes: the same files give the same bytes. Written to a
    partial file first, so a failed export leaves no half archive under the final name.
    """
    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_name(zip_path.name + ".partial")
    try:
        with zipfile.ZipFile(tmp, "w") as archive:
            for arcname, source in sorted(members, key=lambda item: item[0]):
                entry = zipfile.ZipInfo(arcname, date_time=_ZIP_TIME)
                entry.external_attr = (stat.S_IFREG | 0o644) << 16
                entry.create_system = 3  # unix, so the permission bits above mean what they say
                # Weights hardly compress; storing them saves seconds on large models.
                entry.compress_type = zipfile.ZIP_STORED if source.suffix == ".pth" else zipfile.ZIP_DEFLATED
                with open(source, "rb") as src, archive.open(entry, "w", force_zip64=True) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        digest = sha256_file(tmp)
        os.replace(tmp, zip_path)
    finally:
        tmp.unlink(missing_ok=True)
    sidecar = zip_path.with_name(zip_path.name + ".sha256")
    sidecar.write_text(f"{digest}  {zip_path.name}\n")
    return zip_path


# --------------------------------------------------------------------------------------------------
# Import


def import_model(
    zip_path: PathLike, dest_dir: PathLike, overwrite: bool = False, trust_checkpoint: bool = False,
    max_ratio: float = DEFAULT_MAX_RATIO, min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
    check_checkpoints: bool = True,
) -> Path:
    """Validate and extract a model archive; return the model folder.

    The model lands in ``dest_dir/DatasetNNN_Name/<trainer>__<plans>__<configuration>``, so
    ``dest_dir`` can serve directly as ``nnUNet_results``. Accepts archives from
    :func:`export_model` and ``nnUNetv2_export_model_to_zip`` (one model folder per archive).
    If ``<zip_path>.sha256`` exists, the archive must match it. Members follow the one
    safe-extraction rule (:mod:`AutoNNUNetLib.archives`: no escaping names or links, an
    expansion and free-space limit). Nothing is left in ``dest_dir`` unless everything checks
    out: extraction goes to a temporary folder inside ``dest_dir`` that is renamed into place.
    ``check_checkpoints=False`` skips opening the checkpoints (no torch needed): for a model whose
    checkpoints were checked where it was made, such as a job server's result.
    """
    zip_path = Path(zip_path)
    dest_dir = Path(dest_dir)
    if not zip_path.is_file():
        raise ModelError(f"{zip_path}: no such file")
    if dest_dir.exists() and not dest_dir.is_dir():
        raise ModelError(f"{dest_dir}: exists and is not a folder; give a folder to import the model into")
    check_sidecar(zip_path)
    if not zipfile.is_zipfile(zip_path):
        raise ModelError(f"{zip_path}: not a zip archive (a model archive is written by export-model)")
    try:
        _, members = inspect_archive(zip_path)
    except ArchiveError as error:
        raise ModelError(f"{zip_path}: {error}; refusing to extract this archive") from None
    names = [m.path for m in members if not m.is_dir]
    from .selection.archive import SELECTION_MEMBER

    if PurePosixPath(SELECTION_MEMBER) in names:
        raise ModelError(f"{zip_path}: holds a model selection (selection.json), not one model; import it with "
                         "`autonnunet import-model` or AutoNNUNetLib.selection.archive.import_selection")
    model_prefix = _find_model_prefix(zip_path, names)

    def target(member: Member) -> Optional[PurePosixPath]:
        # Only the model's own files: other files of a stock export (another configuration's
        # logs, plots) are left in the archive.
        if member.is_dir or model_prefix not in member.path.parents:
            return None
        relative = member.path.relative_to(model_prefix)
        return PurePosixPath("model", relative) if _wanted(relative) else None

    dest_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=dest_dir))
    try:
        try:
            safe_extract(zip_path, staging, max_ratio=max_ratio, min_free_bytes=min_free_bytes, target=target)
        except ArchiveError as error:
            raise ModelError(f"{zip_path}: {error}") from None
        extracted = staging / "model"
        extracted.mkdir(exist_ok=True)
        _require_files(zip_path, model_prefix, extracted)
        try:
            info = inspect_model(extracted, trust_checkpoint=trust_checkpoint, check_checkpoints=check_checkpoints)
        except ModelError as error:
            # Name the archive member rather than the temporary path.
            raise ModelError(str(error).replace(str(extracted), f"{zip_path}:{model_prefix}")) from None
        dataset_name = info.dataset_name if DATASET_NAME_RE.match(info.dataset_name) else "Dataset999_AutoNNUNet"
        final = dest_dir / dataset_name / info.folder_name
        if final.exists() or final.is_symlink():
            if not overwrite:
                raise ModelError(f"{final}: already exists (pass overwrite=True / --overwrite to replace it)")
            _remove(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(extracted, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("imported %s to %s", zip_path, final)
    return final


def check_sidecar(zip_path: Path) -> None:
    """Refuse an archive whose `<zip>.sha256` sidecar (when present) does not match it."""
    sidecar = zip_path.with_name(zip_path.name + ".sha256")
    if not sidecar.is_file():
        return
    text = sidecar.read_text().strip()
    expected = text.split()[0].lower() if text else ""
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ModelError(f"{sidecar}: not a SHA-256 checksum file")
    actual = sha256_file(zip_path)
    if actual != expected:
        raise ModelError(f"{zip_path}: SHA-256 {actual} does not match {sidecar.name} ({expected}); damaged download?")


def _find_model_prefix(zip_path: Path, names: Sequence[PurePosixPath]) -> PurePosixPath:
    """The folder inside the archive that holds ``plans.json`` (exactly one is allowed)."""
    candidates = sorted({name.parent for name in names if name.name == "plans.json"}, key=str)
    if not candidates:
        raise ModelError(f"{zip_path}: no plans.json inside; not an nnU-Net model archive")
    if len(candidates) > 1:
        listed = ", ".join(str(c) for c in candidates)
        raise ModelError(f"{zip_path}: holds several models ({listed}); export one model per archive")
    return candidates[0]


def _wanted(relative: PurePosixPath) -> bool:
    """Files of a model folder worth extracting: top-level model files and fold checkpoints."""
    parts = relative.parts
    if len(parts) == 1:
        return parts[0] in MODEL_FILES
    return len(parts) == 2 and bool(_FOLD_RE.match(parts[0])) and parts[1].endswith(".pth")


def _require_files(zip_path: Path, prefix: PurePosixPath, extracted: Path) -> None:
    for name in REQUIRED_FILES:
        if not (extracted / name).is_file():
            raise ModelError(f"{zip_path}: {prefix / name} is missing")
    if not available_folds(extracted):
        raise ModelError(
            f"{zip_path}: no {prefix}/fold_N/{CHECKPOINT_NAME} inside (the trained weights are missing)"
        )


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


# --------------------------------------------------------------------------------------------------
# Installing for stock nnU-Net


def install_for_nnunet(
    model_dir: PathLike,
    results_root: PathLike,
    dataset_name: Optional[str] = None,
    link: bool = True,
    overwrite: bool = False,
) -> Path:
    """Make a model folder visible to ``nnUNetv2_predict -d <dataset> -c <configuration>``.

    Places it at ``results_root/<dataset_name>/<trainer>__<plans>__<configuration>`` with
    ``nnUNet_results=results_root``. ``dataset_name`` (``DatasetNNN_Name``) defaults to the one in
    the plans. With ``link`` the place is a symbolic link to ``model_dir`` (no copy of the weights);
    where links are not allowed (Windows without developer mode) it falls back to a copy.
    An existing link there is replaced; an existing real folder (someone's trained model) only
    with ``overwrite``.
    """
    model_dir = Path(model_dir).resolve()
    info = inspect_model(model_dir)
    dataset_name = dataset_name or info.dataset_name
    if not DATASET_NAME_RE.match(dataset_name or ""):
        raise ModelError(
            f"dataset name {dataset_name!r} is not of nnU-Net's form DatasetNNN_Name; nnUNetv2_predict -d cannot find it"
        )
    target = Path(results_root) / dataset_name / info.folder_name
    if target.is_symlink() or target.exists():
        if target.resolve() == model_dir:
            return target
        if not target.is_symlink() and not overwrite:
            raise ModelError(f"{target}: already exists (pass overwrite=True to replace it)")
        _remove(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            target.symlink_to(model_dir, target_is_directory=True)
            return target
        except OSError as error:
            logger.info("cannot link %s (%s); copying instead", target, error)
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=target.parent))
    try:
        copy = staging / "model"
        copy.mkdir()
        for name in MODEL_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, copy / name)
        for fold in info.folds:
            (copy / f"fold_{fold}").mkdir()
            shutil.copy2(model_dir / f"fold_{fold}" / CHECKPOINT_NAME, copy / f"fold_{fold}" / CHECKPOINT_NAME)
        os.replace(copy, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------
# Command line


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export-model",
        help="write a model folder to a zip (+ .sha256) that stock nnU-Net can install",
        description="Validate a model folder and write it as a reproducible zip archive with a SHA-256 sidecar.",
    )
    export.add_argument("model_dir", type=Path,
                        help="model folder (nnU-Net results layout), or a selection root (`autonnunet select`)")
    export.add_argument("zip_path", type=Path, help="archive to write, e.g. model.zip")
    export.add_argument("--folds", nargs="+", default=None, help="folds to include (default: all present)")
    export.set_defaults(func=_cmd_export)

    imp = subparsers.add_parser(
        "import-model",
        help="validate and extract a model zip (or a selection zip)",
        description="Check a model archive (paths, files, checkpoint) and extract it to "
        "DEST/DatasetNNN_Name/<model folder>; DEST can serve as nnUNet_results. A selection archive "
        "(export-model on a selection root) becomes the selection root DEST.",
    )
    imp.add_argument("zip_path", type=Path, help="archive written by export-model or nnUNetv2_export_model_to_zip")
    imp.add_argument("dest_dir", type=Path, help="destination folder")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    imp.add_argument(
        "--trust-checkpoint", action="store_true", help="allow checkpoints that hold arbitrary Python objects"
    )
    imp.add_argument(
        "--skip-checkpoint-check", action="store_true",
        help="do not open the checkpoints (no torch needed); for models checked where they were made (the job server)",
    )
    imp.set_defaults(func=_cmd_import)


def _parse_folds(values: Optional[Iterable[str]]) -> Optional[list[Union[int, str]]]:
    if values is None:
        return None
    try:
        return [v if v == "all" else int(v) for v in values]
    except ValueError as error:
        raise ModelError(f"folds must be integers or 'all', got {list(values)}") from error


def _cmd_export(args: argparse.Namespace) -> int:
    from .selection.archive import export_selection, is_selection_root

    if is_selection_root(args.model_dir):
        if args.folds is not None:
            raise ModelError(f"{args.model_dir}: a selection is exported with the folds it was selected on; "
                             "leave out --folds")
        path = export_selection(args.model_dir, args.zip_path)
    else:
        path = export_model(args.model_dir, args.zip_path, folds=_parse_folds(args.folds))
    print(path)
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from .selection.archive import import_selection, is_selection_archive

    options = dict(overwrite=args.overwrite, trust_checkpoint=args.trust_checkpoint,
                   check_checkpoints=not args.skip_checkpoint_check)
    if is_selection_archive(args.zip_path):
        path = import_selection(args.zip_path, args.dest_dir, **options)
    else:
        path = import_model(args.zip_path, args.dest_dir, **options)
    print(path)
    return 0
