"""What predict reads and writes, checked before the model is loaded.

Loading a model takes seconds (torch, nnU-Net, the checkpoints), so everything that can be wrong
with a request is found first, from files alone: the model folder's JSON and checkpoints are
there, the device exists, every input file exists, holds the model's channels (one file per
channel, or one 4D / vector file holding them all, as ``dataset`` splits them), is complete and
has no NaN/Inf voxels; the output ends in an image format and is not a folder (or, for a folder
of cases, is not a file). Errors are :class:`PredictionError` s, printed by the CLI as one line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

from .errors import AutoNNUNetError
from .model import CHECKPOINT_NAME, ModelError, ModelInfo, available_folds, read_model_info

if TYPE_CHECKING:  # pragma: no cover
    from .dataset.records import ChannelSpec
    from .imaging import Volume

PathLike = Union[str, Path]
#: Endings of label map files predict can write (SimpleITK picks the format by the ending).
OUTPUT_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class PredictionError(AutoNNUNetError, ValueError):
    """The model folder or the input volumes cannot be used for prediction."""


def check_model_folder(model_dir: PathLike, folds: Optional[Sequence[Union[int, str]]] = None,
                       checkpoint: str = CHECKPOINT_NAME) -> ModelInfo:
    """The model folder's description from its JSON files; each requested checkpoint must exist
    and not be empty (its content is checked when the model loads)."""
    model_dir = Path(model_dir)
    for name in ("plans.json", "dataset.json"):
        if not (model_dir / name).is_file():
            raise PredictionError(f"{model_dir / name}: missing; {model_dir} is not a model folder")
    present = available_folds(model_dir, checkpoint)
    if folds is None and not present:
        raise PredictionError(f"{model_dir}: no fold_N/{checkpoint} found")
    if folds is not None:
        missing = [f for f in (f if f == "all" else int(f) for f in folds) if f not in present]
        if missing:
            raise PredictionError(f"{model_dir}: fold(s) {missing} have no {checkpoint} (present: {present or 'none'})")
    try:
        info = read_model_info(model_dir, folds, checkpoint)
    except ModelError as error:
        raise PredictionError(str(error)) from None
    for fold in info.folds:
        path = model_dir / f"fold_{fold}" / checkpoint
        if path.stat().st_size == 0:
            raise PredictionError(f"{path}: empty file (an interrupted copy?)")
    if not info.channel_names:
        raise PredictionError(f"{model_dir / 'dataset.json'}: names no input channels")
    return info


def check_output_file(output: PathLike) -> Path:
    """A label map path predict can write: an image ending, not an existing folder."""
    output = Path(output)
    if output.is_dir():
        raise PredictionError(f"{output}: is a folder; give a file name such as {output / 'segmentation.nii.gz'} "
                              "(or give a folder of cases as input)")
    if not output.name.lower().endswith(OUTPUT_ENDINGS):
        raise PredictionError(f"{output}: unknown image format; the output must end with "
                              f"{', '.join(OUTPUT_ENDINGS)}")
    _check_parent(output)
    return output


def check_output_folder(output: PathLike) -> Path:
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise PredictionError(f"{output}: is a file; with a folder of cases as input the output is a folder")
    _check_parent(output)
    return output


def _check_parent(path: Path) -> None:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PredictionError(f"{path}: cannot be created, {parent} is a file")


def case_channels(inputs: Sequence[PathLike], n_channels: int) -> list["ChannelSpec"]:
    """The model's channels of one case as files (or channels of one 4D/vector file), checked.

    One file per channel, in the model's order; or a single file holding all ``n_channels`` (an
    MSD 4D file, a vector image). Each file must be complete and free of NaN/Inf voxels.
    """
    from .dataset.headers import check_nifti_complete, nonfinite_voxels, read_header
    from .dataset.records import ChannelFile, DatasetError

    paths = [Path(p) for p in inputs]
    for path in paths:
        if not path.is_file():
            raise PredictionError(f"{path}: no such file")
    try:
        headers = [read_header(path) for path in paths]
        if len(paths) == 1 and headers[0].n_channels > 1:
            specs: list = [ChannelFile(paths[0], i) for i in range(headers[0].n_channels)]
        else:
            specs = list(paths)
            for path, header in zip(paths, headers):
                if header.n_channels > 1:
                    raise PredictionError(f"{path}: holds {header.n_channels} channels; give one file per channel "
                                          "or one file holding all of them")
        if len(specs) != n_channels:
            where = f"{paths[0].name} holds" if len(paths) == 1 else "got"
            raise PredictionError(f"the model expects {n_channels} channel(s); {where} {len(specs)}")
        for path in paths:
            check_nifti_complete(path)
            bad = nonfinite_voxels(path)
            if bad:
                raise PredictionError(f"{path}: {bad} voxel(s) are NaN or infinite; the model cannot segment them")
    except DatasetError as error:
        raise PredictionError(str(error)) from None
    return specs


def read_case(specs: Sequence["ChannelSpec"]) -> list["Volume"]:
    """The channels of :func:`case_channels` as volumes (a 4D file is read once)."""
    import SimpleITK as sitk

    from .dataset.headers import FileCache, load_image
    from .dataset.records import DatasetError
    from .imaging import Geometry, Volume

    cache = FileCache()
    volumes = []
    try:
        for spec in specs:
            image = load_image(spec, cache)
            volumes.append(Volume(sitk.GetArrayFromImage(image), Geometry.from_image(image)))
    except DatasetError as error:
        raise PredictionError(str(error)) from None
    return volumes


def find_cases(input_dir: PathLike, file_ending: str, n_channels: int) -> dict[str, list[Path]]:
    """Group ``<case>_XXXX<ending>`` files of a folder by case; every case needs every channel."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise PredictionError(f"{input_dir}: no such folder")
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(file_ending) + r"$")
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(input_dir.iterdir()):
        match = pattern.match(path.name)
        if match and path.is_file():
            found.setdefault(match.group("case"), {})[int(match.group("channel"))] = path
    if not found:
        raise PredictionError(f"{input_dir}: no images named <case>_0000{file_ending}")
    cases: dict[str, list[Path]] = {}
    for case_id, files in sorted(found.items()):
        missing = [c for c in range(n_channels) if c not in files]
        if missing:
            names = ", ".join(f"{case_id}_{c:04d}{file_ending}" for c in missing)
            raise PredictionError(f"{input_dir}: case {case_id} lacks {names}")
        cases[case_id] = [files[c] for c in range(n_channels)]
    return cases
