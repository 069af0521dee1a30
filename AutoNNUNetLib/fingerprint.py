"""Dataset fingerprint, experiment plans and preprocessing, with a summary people can read.

This step drives nnU-Net's own machinery through its Python API (nnunetv2 2.8.1):

1. ``DatasetFingerprintExtractor``: spacings, shapes after cropping and foreground intensity
   statistics of every training case (``dataset_fingerprint.json``);
2. ``ExperimentPlanner``: target spacing, patch size, batch size and the U-Net topology
   (``nnUNetPlans.json``);
3. the configured preprocessor: resampled, normalized training data for each requested
   configuration, plus the ground truth copy nnU-Net's validation reads (``gt_segmentations``).

:func:`summarize` then condenses those files into a :class:`FingerprintSummary`: what a radiologist
wants to check before spending GPU hours (spacing, image size, intensities, class sizes) and what an
nnU-Net user wants to see (patch, batch, network).

Axis order: every spatial tuple of the summary (spacing, shapes, patch size) is given in image
``(x, y, z)`` order (``(x, y)`` for 2D images), the order SimpleITK's ``GetSpacing``/``GetSize``
and Slicer's IJK use. nnU-Net stores these in array order, possibly transposed by the plans'
``transpose_forward``; the summary undoes both so that numbers can be compared with what a viewer
shows.

Example::

    from AutoNNUNetLib.workspace import Workspace
    from AutoNNUNetLib.fingerprint import plan_and_preprocess

    summary = plan_and_preprocess(Workspace("work"))
    print(summary.to_text())
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .errors import AutoNNUNetError
from .files import atomic_write_json
from .events import ProgressCallback, ProgressEvent
from .workspace import PLANS_NAME, Workspace, WorkspaceError

logger = logging.getLogger(__name__)

#: Where :func:`plan_and_preprocess` caches the voxel counts per class (inside the preprocessed
#: dataset folder), so that :func:`summarize` does not need to read every label map again.
CLASS_VOXELS_FILE = "autonnunet_class_voxels.json"


class FingerprintError(AutoNNUNetError, ValueError):
    """The fingerprint, plans or preprocessing step cannot run or its files are incomplete."""


@dataclass
class ChannelIntensity:
    """Foreground intensity statistics of one input channel (from nnU-Net's fingerprint).

    nnU-Net samples the voxels under the foreground labels of all training cases; CT normalization
    clips to the 0.5 / 99.5 percentiles and uses the mean and standard deviation below.
    """

    name: str
    normalization: str
    mean: float
    std: float
    median: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass
class FingerprintSummary:
    """What nnU-Net learned about a dataset and what it plans to train on it.

    Spatial tuples are in image ``(x, y, z)`` order (see the module documentation).
    """

    dataset_name: str
    n_cases: int
    #: Channel names in channel order (``dataset.json`` ``channel_names``), e.g. ``["MRI"]``.
    modality: list[str]
    #: Median voxel spacing of the training images, in mm.
    spacing: tuple[float, ...]
    #: Median image shape after nnU-Net's crop to the non-zero region, in voxels.
    median_shape: tuple[int, ...]
    intensity: list[ChannelIntensity]
    #: Class name -> number of voxels with that label over all training cases.
    voxels_per_class: dict[str, int]
    #: The planned configuration summarized below (``3d_fullres``, or ``2d`` for 2D data).
    configuration: str
    #: Spacing the configuration resamples to, in mm.
    target_spacing: tuple[float, ...]
    #: Training patch size in voxels; for a 2D configuration on 3D data the slice axis reads 1.
    patch_size: tuple[int, ...]
    batch_size: int
    n_stages: int
    features_per_stage: tuple[int, ...]
    #: Fully qualified class of the network (dynamic_network_architectures).
    network_class: str
    #: All configurations present in the plans (nnU-Net always plans ``2d`` as well).
    configurations: list[str] = field(default_factory=list)
    axis_order: str = "xyz"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    def to_text(self) -> str:
        """A compact, aligned table for terminals and logs."""

        def dims(values: Sequence[Any], fmt: str = "{}") -> str:
            return " x ".join(fmt.format(v) for v in values)

        total = sum(self.voxels_per_class.values()) or 1
        rows: list[tuple[str, str]] = [
            ("dataset", f"{self.dataset_name} ({self.n_cases} training cases)"),
            ("channels", ", ".join(f"{i}: {name}" for i, name in enumerate(self.modality))),
            ("median spacing (x, y, z)", dims(self.spacing, "{:.4g}") + " mm"),
            ("median shape (x, y, z)", dims(self.median_shape) + " voxels (after crop to non-zero)"),
        ]
        for channel in self.intensity:
            rows.append(
                (
                    f"intensity [{channel.name}]",
                    f"mean {channel.mean:.4g}, std {channel.std:.4g}, "
                    f"p0.5 {channel.percentile_00_5:.4g}, p99.5 {channel.percentile_99_5:.4g} "
                    f"({channel.normalization})",
                )
            )
        for name, count in self.voxels_per_class.items():
            rows.append((f"voxels [{name}]", f"{count:,} ({100.0 * count / total:.2f} %)"))
        rows += [
            ("configuration", self.configuration + f" (planned: {', '.join(self.configurations)})"),
            ("target spacing (x, y, z)", dims(self.target_spacing, "{:.4g}") + " mm"),
            ("patch size (x, y, z)", dims(self.patch_size)),
            ("batch size", str(self.batch_size)),
            ("stages", str(self.n_stages)),
            ("features per stage", ", ".join(str(f) for f in self.features_per_stage)),
            ("network", self.network_class),
        ]
        width = max(len(key) for key, _ in rows)
        return "\n".join(f"{key.ljust(width)}  {value}" for key, value in rows)


# --------------------------------------------------------------------------------------------------
# Running nnU-Net


def plan_and_preprocess(
    workspace: Workspace,
    configurations: Sequence[str] = ("3d_fullres",),
    num_processes: int = 2,
    progress: Optional[ProgressCallback] = None,
    verbose: bool = False,
) -> FingerprintSummary:
    """Extract the fingerprint, plan and preprocess the workspace's raw dataset.

    Args:
        workspace: holds ``nnUNet_raw/DatasetNNN_Name`` (see :mod:`AutoNNUNetLib.dataset`).
        configurations: configurations to preprocess. ``3d_fullres`` is replaced by ``2d`` when the
            data is 2D (nnU-Net plans no 3D configuration then).
        num_processes: worker processes for fingerprinting and preprocessing. nnU-Net spawns them,
            so a script calling this needs an ``if __name__ == "__main__":`` guard.
        progress: optional callback receiving ``stage`` and ``progress`` events.
        verbose: let nnU-Net's own console output through (otherwise it goes to the debug log).

    Returns:
        The summary of the first preprocessed configuration.
    """
    emit = progress or (lambda event: None)
    num_processes = max(1, int(num_processes))
    dataset_name = workspace.require_dataset()
    if not (workspace.raw_dataset / "dataset.json").is_file():
        raise FingerprintError(f"{workspace.raw_dataset / 'dataset.json'} is missing: build the dataset first")

    # nnU-Net reads its path variables at use time, so importing inside the block is not needed
    # for correctness; importing here keeps `autonnunet --help` fast.
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    with workspace.activate(), _nnunet_output(verbose):
        emit(ProgressEvent("stage", {"name": "fingerprint", "message": f"extracting the fingerprint of {dataset_name}"}))
        extractor = DatasetFingerprintExtractor(dataset_name, num_processes, verbose=verbose)
        extractor.show_progress_bar = verbose
        extractor.run(overwrite_existing=True)
        emit(ProgressEvent("progress", {"fraction": 0.3, "message": "fingerprint extracted"}))

        emit(ProgressEvent("stage", {"name": "fingerprint", "message": "planning experiments"}))
        with _planner_thread_setting(num_processes):
            planner = ExperimentPlanner(dataset_name, plans_name=PLANS_NAME, suppress_transpose=False)
            plans = planner.plan_experiment()
        emit(ProgressEvent("progress", {"fraction": 0.4, "message": "experiments planned"}))

        planned = list(plans["configurations"])
        todo = _configurations_to_preprocess(configurations, planned)
        _preprocess(workspace, todo, num_processes, emit, verbose)

    dataset_json = workspace.load_dataset_json()
    counts = count_class_voxels(workspace.raw_dataset, dataset_json)
    atomic_write_json(workspace.preprocessed_dataset / CLASS_VOXELS_FILE, counts, indent=1)
    summary = summarize(workspace, configuration=todo[0])
    emit(ProgressEvent("progress", {"fraction": 1.0, "message": "fingerprint and plans ready"}))
    return summary


def _planned(workspace: Workspace) -> dict:
    """The workspace's plans; :class:`FingerprintError` when it was not planned yet."""
    if not workspace.plans_file.is_file():
        raise FingerprintError(f"{workspace.plans_file} is missing: plan the dataset first")
    return _load_json_file(workspace.plans_file, ("configurations",))


def preprocess(
    workspace: Workspace,
    configurations: Sequence[str],
    num_processes: int = 2,
    progress: Optional[ProgressCallback] = None,
    verbose: bool = False,
) -> None:
    """Preprocess more configurations of an already planned workspace (the plans stay as they are).

    For a configuration the first run left out, e.g. ``2d`` for a search that takes the
    configuration as a choice. Raises :class:`FingerprintError` for a configuration not planned.
    """
    plans = _planned(workspace)
    todo = _configurations_to_preprocess(configurations, list(plans["configurations"]))
    with workspace.activate(), _nnunet_output(verbose):
        _preprocess(workspace, todo, max(1, int(num_processes)), progress or (lambda event: None), verbose)


def preprocess_missing(
    workspace: Workspace,
    configurations: Sequence[str],
    num_processes: int = 2,
    progress: Optional[ProgressCallback] = None,
    verbose: bool = False,
) -> list[str]:
    """Preprocess those of ``configurations`` that the plans hold and whose data is not there yet.

    What a job asking for configurations beyond the default needs after the shared plan step: it
    never re-plans, costs nothing when all are there, and leaves a configuration nnU-Net did not
    plan to the caller (a search names it, a selection skips it). Returns the ones it preprocessed.
    """
    from .config import planned_configurations

    plans = _planned(workspace)
    missing = [name for name in dict.fromkeys(configurations) if name in planned_configurations(plans)
               and not (workspace.preprocessed_dataset / plans["configurations"][name]["data_identifier"]).is_dir()]
    if missing:
        preprocess(workspace, missing, num_processes=num_processes, progress=progress, verbose=verbose)
    return missing


def _preprocess(workspace: Workspace, todo: Sequence[str], num_processes: int, emit: ProgressCallback,
                verbose: bool) -> None:
    """nnU-Net's preprocessor for each of ``todo`` (inside ``workspace.activate()``)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_name = workspace.require_dataset()
    plans_manager = PlansManager(str(workspace.plans_file))
    for index, name in enumerate(todo):
        emit(ProgressEvent("stage", {"name": "fingerprint", "message": f"preprocessing {name}"}))
        configuration_manager = plans_manager.get_configuration(name)
        preprocessor = configuration_manager.preprocessor_class(verbose=verbose)
        preprocessor.show_progress_bar = verbose
        preprocessor.run(dataset_name, name, PLANS_NAME, num_processes=num_processes)
        emit(
            ProgressEvent(
                "progress",
                {"fraction": 0.4 + 0.5 * (index + 1) / len(todo), "message": f"{name} preprocessed"},
            )
        )
    _copy_ground_truth(workspace)


def _configurations_to_preprocess(requested: Sequence[str], planned: Sequence[str]) -> list[str]:
    """Requested configurations that the plans hold; ``3d_fullres`` falls back to ``2d`` for 2D data."""
    todo: list[str] = []
    for name in requested:
        if name not in planned and name == "3d_fullres" and "2d" in planned:
            logger.info("the data is 2D: nnU-Net planned no 3d_fullres configuration, using 2d")
            name = "2d"
        if name not in planned:
            raise FingerprintError(f"configuration {name!r} was not planned (planned: {', '.join(planned)})")
        if name not in todo:
            todo.append(name)
    if not todo:
        raise FingerprintError("no configuration requested")
    return todo


@contextlib.contextmanager
def _planner_thread_setting(num_processes: int) -> Iterator[None]:
    """Make ``nnUNet_n_proc_DA`` usable by the 2.8.1 planner for the duration of the block.

    The planner calls ``torch.set_num_threads(get_allowed_n_proc_DA())`` while estimating memory,
    which fails on 0 - and 0 is exactly what in-process training wants in this variable. So a
    value below 1 (or garbage) is replaced by the process count here and restored afterwards.
    """
    name = "nnUNet_n_proc_DA"
    saved = os.environ.get(name)
    try:
        usable = saved is None or int(saved) >= 1
    except ValueError:
        usable = False
    if not usable:
        os.environ[name] = str(num_processes)
    try:
        yield
    finally:
        if not usable:
            if saved is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = saved


@contextlib.contextmanager
def _nnunet_output(verbose: bool) -> Iterator[None]:
    """Route nnU-Net's prints to the debug log unless ``verbose`` (keeps ``--json`` output clean)."""
    if verbose:
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        text = buffer.getvalue().strip()
        if text:
            logger.debug("nnU-Net output:\n%s", text)


def _copy_ground_truth(workspace: Workspace) -> None:
    """Copy the label maps to ``gt_segmentations`` as nnU-Net's own preprocessing does.

    nnU-Net's validation reads them from the preprocessed folder so that training works without the
    raw data. nnU-Net copies them with ``distutils``, which Python 3.12 no longer ships; shutil
    does the same job.
    """
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset_json = json.loads((workspace.raw_dataset / "dataset.json").read_text())
    target = workspace.preprocessed_dataset / "gt_segmentations"
    target.mkdir(parents=True, exist_ok=True)
    cases = get_filenames_of_train_images_and_targets(str(workspace.raw_dataset), dataset_json)
    for case_id, entry in cases.items():
        destination = target / f"{case_id}{dataset_json['file_ending']}"
        source = Path(entry["label"])
        if not destination.exists() or destination.stat().st_mtime < source.stat().st_mtime:
            shutil.copy2(source, destination)


# --------------------------------------------------------------------------------------------------
# Reading the results back


def count_class_voxels(raw_dataset: Path, dataset_json: dict) -> dict[str, int]:
    """Voxels per class name over all training label maps of a raw dataset.

    nnU-Net's fingerprint does not record class sizes, so the label maps are read once with
    SimpleITK. Region-based label entries (a list of values) count the voxels of any of them.
    """
    import SimpleITK as sitk
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    labels: dict[str, Any] = dataset_json["labels"]
    cases = get_filenames_of_train_images_and_targets(str(raw_dataset), dataset_json)
    histogram = np.zeros(0, dtype=np.int64)
    for entry in cases.values():
        # A copy, not GetArrayViewFromImage: a view of a temporary image reads freed memory.
        values = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(entry["label"])))).astype(np.int64).ravel()
        if values.size and values.min() < 0:
            raise FingerprintError(f"{entry['label']}: negative label values")
        counts = np.bincount(values)
        if counts.size > histogram.size:
            histogram = np.pad(histogram, (0, counts.size - histogram.size))
        histogram[: counts.size] += counts

    def voxels(value: int) -> int:
        return int(histogram[value]) if 0 <= value < histogram.size else 0

    result: dict[str, int] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            result[name] = sum(voxels(int(v)) for v in set(value))
        else:
            result[name] = voxels(int(value))
    return result


def _load_json_file(path: Path, required: Sequence[str]) -> dict:
    """A JSON object with the ``required`` keys, or a :class:`FingerprintError` naming the file.

    An interrupted run or a hand edit leaves a broken plans or fingerprint file; the message says
    which file and that running the step again rewrites it.
    """
    again = "run `autonnunet fingerprint` again to rewrite it"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise FingerprintError(f"cannot read {path}: {error}") from None
    except ValueError as error:
        raise FingerprintError(f"{path} is not valid JSON ({error}); {again}") from None
    if not isinstance(data, dict):
        raise FingerprintError(f"{path} does not hold a JSON object; {again}")
    missing = [key for key in required if key not in data]
    if missing:
        raise FingerprintError(f"{path} lacks {', '.join(repr(k) for k in missing)}; {again}")
    return data


def summarize(workspace: Workspace, configuration: str = "3d_fullres") -> FingerprintSummary:
    """Build the summary from the files :func:`plan_and_preprocess` wrote (no computation but counts).

    ``configuration`` falls back to ``2d`` when ``3d_fullres`` was asked for and the data is 2D.
    """
    folder = workspace.preprocessed_dataset
    fingerprint_file = folder / "dataset_fingerprint.json"
    if not fingerprint_file.is_file():
        raise FingerprintError(
            f"{fingerprint_file} is missing: run `autonnunet fingerprint --workdir {workspace.root}` first"
        )
    fingerprint = _load_json_file(fingerprint_file, ("spacings", "shapes_after_crop"))
    if not workspace.plans_file.is_file():
        try:
            workspace.load_plans()  # its own message says which step is missing
        except WorkspaceError as error:
            raise FingerprintError(str(error)) from error
    plans = _load_json_file(workspace.plans_file, ("configurations", "transpose_backward"))
    dataset_json = workspace.load_dataset_json()
    planned = list(plans["configurations"])
    configuration = _configurations_to_preprocess([configuration], planned)[0]

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    # PlansManager resolves "inherits_from" chains, so derived configurations read correctly.
    config = PlansManager(plans).get_configuration(configuration).configuration
    transpose_backward = [int(i) for i in plans["transpose_backward"]]

    # The fingerprint's per-case spacings and shapes are in (untransposed) array order: reversed
    # SimpleITK order, because nnU-Net's SimpleITKIO reverses the spacing to match the array.
    spacing_xyz = tuple(float(v) for v in np.median(np.asarray(fingerprint["spacings"], float), axis=0)[::-1])
    shape_xyz = tuple(
        int(round(v)) for v in np.median(np.asarray(fingerprint["shapes_after_crop"], float), axis=0)[::-1]
    )

    channel_names = _channel_names(dataset_json)
    schemes = config.get("normalization_schemes") or ["?"] * len(channel_names)
    stats = fingerprint.get("foreground_intensity_properties_per_channel", {})
    intensity = []
    for index, name in enumerate(channel_names):
        entry = stats.get(str(index), stats.get(index, {}))  # JSON turns the int keys into strings
        intensity.append(
            ChannelIntensity(
                name=name,
                normalization=str(schemes[index] if index < len(schemes) else "?"),
                mean=float(entry.get("mean", float("nan"))),
                std=float(entry.get("std", float("nan"))),
                median=float(entry.get("median", float("nan"))),
                min=float(entry.get("min", float("nan"))),
                max=float(entry.get("max", float("nan"))),
                percentile_00_5=float(entry.get("percentile_00_5", float("nan"))),
                percentile_99_5=float(entry.get("percentile_99_5", float("nan"))),
            )
        )

    counts_file = folder / CLASS_VOXELS_FILE
    if counts_file.is_file():
        voxels_per_class = {str(k): int(v) for k, v in json.loads(counts_file.read_text()).items()}
    else:
        voxels_per_class = count_class_voxels(workspace.raw_dataset, dataset_json)

    architecture = config.get("architecture", {})
    arch_kwargs = architecture.get("arch_kwargs", {})
    features = tuple(int(f) for f in arch_kwargs.get("features_per_stage", ()))
    n_stages = int(arch_kwargs.get("n_stages", len(features)))

    target_spacing = tuple(float(v) for v in _plans_to_xyz(config["spacing"], transpose_backward, 0.0))
    patch_size = tuple(int(v) for v in _plans_to_xyz(config["patch_size"], transpose_backward, 1))
    if all(int(shape[0]) == 1 for shape in fingerprint["shapes_after_crop"]):
        # 2D images: nnU-Net reads them as one slice (array axis 0, i.e. z) with a made-up spacing
        # of 999 x the largest in-plane one. Report the two real axes only.
        spacing_xyz, shape_xyz = spacing_xyz[:-1], shape_xyz[:-1]
        target_spacing, patch_size = target_spacing[:-1], patch_size[:-1]

    return FingerprintSummary(
        dataset_name=workspace.require_dataset(),
        n_cases=len(fingerprint["spacings"]),
        modality=channel_names,
        spacing=spacing_xyz,
        median_shape=shape_xyz,
        intensity=intensity,
        voxels_per_class=voxels_per_class,
        configuration=configuration,
        target_spacing=target_spacing,
        patch_size=patch_size,
        batch_size=int(config["batch_size"]),
        n_stages=n_stages,
        features_per_stage=features,
        network_class=str(architecture.get("network_class_name", "")),
        configurations=planned,
    )


def _plans_to_xyz(values: Sequence[float], transpose_backward: Sequence[int], filler: float) -> list[float]:
    """Map a tuple from the plans' transposed array order to image ``(x, y, z)`` order.

    Array axis ``j`` is transposed axis ``transpose_backward[j]``. A 2D configuration describes
    only the transposed axes 1 and 2; its slice axis (transposed axis 0) gets ``filler``.
    """
    values = list(values)
    if len(values) == len(transpose_backward) - 1:
        values = [filler, *values]
    array_order = [values[transpose_backward[axis]] for axis in range(len(values))]
    return array_order[::-1]


def _channel_names(dataset_json: dict) -> list[str]:
    names = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    return [str(names[key]) for key in sorted(names, key=lambda k: int(k))]


# --------------------------------------------------------------------------------------------------
# Command line


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fingerprint",
        help="fingerprint, plan and preprocess the workspace's dataset (nnU-Net), then print the summary",
        description="Run nnU-Net's fingerprint extraction, experiment planning (3d_fullres; 2d for 2D data) "
        "and preprocessing on the dataset of a workspace, then print what was found and planned.",
    )
    parser.add_argument("--workdir", required=True, type=Path, help="workspace folder")
    parser.add_argument("--dataset", default=None, help="DatasetNNN_Name (needed when the workspace holds several)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--configurations", nargs="+", default=["3d_fullres"],
        help="configurations to preprocess (default 3d_fullres; e.g. 2d 3d_fullres for a search over both)",
    )
    parser.add_argument(
        "--summary-only", action="store_true", help="do not recompute: summarize the existing plans"
    )
    parser.add_argument(
        "--missing-only", action="store_true",
        help="keep the plans: only preprocess those of --configurations that are planned and not preprocessed yet",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    workspace = Workspace(args.workdir, dataset_name=args.dataset)
    if args.missing_only:
        done = preprocess_missing(workspace, args.configurations, num_processes=args.processes, progress=_log_progress,
                                  verbose=bool(getattr(args, "verbose", False)))
        print(f"preprocessed: {', '.join(done)}" if done else "nothing to preprocess: "
              "the requested configurations are preprocessed or not planned")
        return 0
    if args.summary_only:
        summary = summarize(workspace)
    else:
        summary = plan_and_preprocess(
            workspace, configurations=args.configurations, num_processes=args.processes, progress=_log_progress, verbose=bool(getattr(args, "verbose", False))
        )
    if args.json:
        json.dump(summary.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(summary.to_text())
    return 0


def _log_progress(event: ProgressEvent) -> None:
    if event.kind == "stage":
        logger.info("%s", event.data.get("message", ""))
