"""Segmenting volumes with a trained model: load once, predict many, arrays in and out.

:class:`Predictor` wraps nnU-Net's ``nnUNetPredictor``, built once per model, and feeds it through
nnU-Net's in-memory path: the same preprocessing, sliding-window inference (Gaussian-weighted tiles,
optional mirroring) and export to the original grid that ``nnUNetv2_predict`` runs, minus what
makes the command slow per volume: process start, model loading, file round trips, and the spawned
preprocessing and export worker pools. Label maps are therefore the ones ``nnUNetv2_predict``
writes for the same model, folds and mirroring setting (the tests check equality voxel by voxel).

Inputs are :class:`~AutoNNUNetLib.dataset.Volume` objects, one per channel in the model's channel
order, each a numpy array in SimpleITK order ``(z, y, x)`` with its geometry. nnU-Net's
``SimpleITKIO`` reads files into exactly that layout and reverses SimpleITK's ``(x, y, z)`` spacing
to match the array, which is what :meth:`Predictor.predict` does for in-memory arrays. The result
is a label map on the input's grid: same shape, spacing, origin and direction.

Example::

    from AutoNNUNetLib.dataset import Volume
    from AutoNNUNetLib.inference import Predictor

    predictor = Predictor("models/nnUNetTrainer__nnUNetPlans__3d_fullres", device="auto")
    labels = predictor.predict([Volume.read("case_0000.nii.gz")])
    labels.write("case_seg.nii.gz")

Scripts that predict need an ``if __name__ == "__main__":`` guard: nnU-Net modules start worker
processes with ``spawn`` in places, and those re-import the calling script.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import numpy as np

from .events import EventWriter, ProgressCallback, ProgressEvent
# Re-exported: callers import the error and the folder reader from here.
from .inference_inputs import (  # noqa: F401
    OUTPUT_ENDINGS, PredictionError, case_channels, check_model_folder, check_output_file, check_output_folder,
    find_cases, read_case,
)
from .model import CHECKPOINT_NAME

if TYPE_CHECKING:  # pragma: no cover - typing only; dataset imports SimpleITK at module level
    from .dataset import Volume

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
#: nnU-Net readers whose array layout is SimpleITK's; in-memory input follows the same convention.
_SITK_READERS = ("SimpleITKIO",)


class Predictor:
    """A trained nnU-Net model loaded once, ready to segment many volumes.

    Args:
        model_dir: a model folder in nnU-Net's results layout (``plans.json``, ``dataset.json``,
            ``fold_N/<checkpoint>``), e.g. one written by :func:`AutoNNUNetLib.trainer.train` or
            :func:`AutoNNUNetLib.model.import_model`.
        folds: folds to ensemble (their softmax outputs are averaged); default all present.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cuda``, ``cuda:N``, ``mps`` or ``cpu``.
        use_mirroring: test-time augmentation by mirroring along the axes the model was trained
            to be invariant to (``nnUNetv2_predict`` does this unless ``--disable_tta``): more
            robust, 2**axes times slower.
        checkpoint: checkpoint file name inside each fold folder.
        largest_component: keep only the largest connected component of each class (the rest
            becomes background), nnU-Net's own post-processing operation applied per class
            (voxels touching at faces, edges or corners are connected).
        tile_step_size: sliding-window step as a fraction of the patch size (nnU-Net's 0.5).
        max_memory_gb: most memory one prediction may add (model and input not counted). Every
            prediction takes the bounded path (:mod:`AutoNNUNetLib.bounded`): logits in float16 on
            the network grid, resampled and turned into labels slab by slab, the same labels as
            nnU-Net's in-memory path; ``None`` plans slabs of about 512 MB. A budget that cannot
            hold one tile is refused before any work.
        original_labels: write label maps in the label values of the training files when intake
            renumbered them (``--classes pz=7,tz=8`` -> 0, 1, 2 in training; recorded in the model's
            dataset.json by :mod:`AutoNNUNetLib.dataset.classes`); a model without the record keeps
            its values.
        engine: the tile forward pass: ``auto`` (torch; see :mod:`AutoNNUNetLib.engines` for why),
            ``torch``, ``onnxruntime`` or ``openvino`` (CPU only, exported once beside the checkpoint).
    """

    def __init__(
        self,
        model_dir: PathLike,
        folds: Optional[Sequence[Union[int, str]]] = None,
        device: Union[str, Any] = "auto",
        use_mirroring: bool = False,
        checkpoint: str = CHECKPOINT_NAME,
        largest_component: bool = False,
        tile_step_size: float = 0.5,
        max_memory_gb: Optional[float] = None,
        engine: str = "auto",
        original_labels: bool = False,
    ) -> None:
        from .workspace import resolve_device

        self.model_dir = Path(model_dir)
        self.info = check_model_folder(self.model_dir, folds, checkpoint)
        self.folds: list[Union[int, str]] = list(self.info.folds)
        self.checkpoint = checkpoint
        self.use_mirroring = bool(use_mirroring)
        self.largest_component = bool(largest_component)
        self.device = resolve_device(device)

        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        # nnU-Net announces its device handling on stdout; keep a library call quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            predictor = nnUNetPredictor(
                tile_step_size=tile_step_size,
                use_gaussian=True,
                use_mirroring=self.use_mirroring,
                # Keeping logits on the GPU saves transfers; nnU-Net supports it on CUDA only.
                perform_everything_on_device=self.device.type == "cuda",
                device=self.device,
                verbose=False,
                verbose_preprocessing=False,
                allow_tqdm=False,
            )
            try:
                predictor.initialize_from_trained_model_folder(
                    str(self.model_dir), use_folds=tuple(self.folds), checkpoint_name=checkpoint
                )
            except Exception as error:  # a corrupt or truncated checkpoint: torch raises many types
                files = ", ".join(str(self.model_dir / f"fold_{f}" / checkpoint) for f in self.folds)
                text = str(error).strip().splitlines()
                raise PredictionError(f"cannot load the model from {files}: "
                                      f"{text[-1] if text else type(error).__name__} (truncated or corrupt?)") from None
        self._predictor = predictor
        from .bounded.budget import check_budget_value
        from .engines import make_engine

        self.max_memory_gb = check_budget_value(max_memory_gb)
        self._engine = make_engine(engine, predictor, model_dir=self.model_dir, folds=self.folds, checkpoint=checkpoint)
        self.dataset_json: dict = predictor.dataset_json
        self.plans: dict = predictor.plans_manager.plans
        self.channel_names: list[str] = [
            str(self.dataset_json["channel_names"][k])
            for k in sorted(self.dataset_json["channel_names"], key=lambda key: int(key))
        ]
        self.labels: dict[str, Any] = dict(self.dataset_json["labels"])
        from .dataset.classes import read_original_labels

        #: ``{value in training: value in the source files}``, applied when ``original_labels``.
        self.original_values = read_original_labels(self.dataset_json) if original_labels else None
        reader = self.plans.get("image_reader_writer", "SimpleITKIO")
        if reader not in _SITK_READERS:
            logger.warning(
                "%s was trained on images read by %s; in-memory input follows SimpleITK's array layout, "
                "which may differ from that reader's", self.model_dir, reader,
            )

    # ----------------------------------------------------------------------------------------------

    @property
    def network(self):
        """The ``torch.nn.Module`` in use (weights of the first fold unless several are ensembled)."""
        return self._predictor.network

    @property
    def nnunet_predictor(self):
        """The underlying ``nnUNetPredictor`` (for benchmarks and power users)."""
        return self._predictor

    def predict(self, channels: Sequence["Volume"], progress: Optional[ProgressCallback] = None,
                cancel: Optional[Callable[[], bool]] = None,
                save_probabilities: Optional[PathLike] = None) -> "Volume":
        """Segment one case given as one :class:`Volume` per channel (the model's channel order).

        Returns a label map (``uint8``, or ``uint16`` beyond 254 classes) with the same array
        shape and the same geometry object as the first channel. ``progress`` receives tile and
        slab progress events; ``cancel`` returning True stops between tiles
        (``PredictionCancelled``); ``save_probabilities`` writes the class probabilities to a
        ``.npy`` file slab by slab.
        """
        from .dataset import Volume

        image, properties = self.prepare_array(channels)
        segmentation = self.segment_array(image, properties, progress, cancel, save_probabilities)
        if self.original_values is not None:
            from .dataset.classes import restore_original_labels

            segmentation = restore_original_labels(segmentation, self.original_values)
        if channels[0].array.ndim == 2:
            segmentation = segmentation[0]  # nnU-Net treats a 2D image as one slice of a 3D stack
        return Volume(segmentation, channels[0].geometry)

    def predict_file(self, inputs: Sequence[PathLike], output: PathLike,
                     progress: Optional[ProgressCallback] = None,
                     cancel: Optional[Callable[[], bool]] = None,
                     save_probabilities: Optional[PathLike] = None) -> Path:
        """Segment one case from image files (one per channel, or one file holding all channels);
        write the label map to ``output``. Inputs and output are checked before inference."""
        output = check_output_file(output)
        volumes = read_case(case_channels(inputs, len(self.channel_names)))
        return self.predict(volumes, progress, cancel, save_probabilities).write(output)

    def predict_folder(
        self,
        input_dir: PathLike,
        output_dir: PathLike,
        progress: Optional[ProgressCallback] = None,
    ) -> list[Path]:
        """Segment every case of a folder in nnU-Net naming (``<case>_0000<ending>``, ...).

        Each label map is written as ``output_dir/<case><ending>``. Returns the written paths.
        """
        ending = str(self.dataset_json.get("file_ending", ".nii.gz"))
        cases = check_folder_cases(input_dir, ending, len(self.channel_names))
        return self.predict_cases(cases, check_output_folder(output_dir), progress)

    def predict_cases(self, cases: dict[str, list], output_dir: PathLike,
                      progress: Optional[ProgressCallback] = None) -> list[Path]:
        """Segment checked cases (:func:`check_folder_cases`) into ``output_dir/<case><ending>``."""
        return segment_cases(self.predict, cases, output_dir, str(self.dataset_json.get("file_ending", ".nii.gz")),
                             progress)

    def warmup(self) -> None:
        """Run one patch through the network so the first real call does not pay lazy set-up."""
        import torch

        patch = [int(v) for v in self._predictor.configuration_manager.patch_size]
        x = torch.zeros((1, len(self.channel_names), *patch), device=self.device)
        with torch.inference_mode():
            self._predictor.network.to(self.device).eval()(x)

    # ----------------------------------------------------------------------------------------------

    def prepare_array(self, channels: Sequence["Volume"]) -> tuple[np.ndarray, dict]:
        """The channels as :meth:`segment_array` takes them, stacked the way ``SimpleITKIO.read_images``
        does; checks that they fit the model and each other."""
        if len(channels) != len(self.channel_names):
            raise PredictionError(
                f"the model expects {len(self.channel_names)} channel(s) ({', '.join(self.channel_names)}), "
                f"got {len(channels)}"
            )
        first = channels[0]
        if first.array.ndim not in (2, 3):
            raise PredictionError(f"channel 0: expected a 2D or 3D array, got shape {first.array.shape}")
        for index, volume in enumerate(channels[1:], start=1):
            if volume.array.shape != first.array.shape:
                raise PredictionError(
                    f"channel {index} ({self.channel_names[index]}): shape {volume.array.shape} differs from "
                    f"channel 0's {first.array.shape}"
                )
            if not volume.geometry.close_to(first.geometry):
                differences = "; ".join(volume.geometry.differences(first.geometry))
                raise PredictionError(f"channel {index} ({self.channel_names[index]}): grid differs from channel 0: {differences}")
        if first.array.ndim == 2 and len(self._predictor.configuration_manager.patch_size) == 3:
            raise PredictionError("this is a 3D model; it cannot segment a 2D image (give a 3D volume)")
        if len(channels) == 1:
            # A view, not a float32 copy: the bounded preprocessing converts slab by slab (same values).
            image = np.asarray(first.array)[None]
        else:
            image = np.stack([np.asarray(v.array) for v in channels]).astype(np.float32, copy=False)
        if np.issubdtype(image.dtype, np.inexact) and not np.all(np.isfinite(image)):
            raise PredictionError("the input contains NaN or infinite values")
        spacing = [abs(float(s)) for s in first.geometry.spacing[::-1]]  # (x, y, z) -> array order
        if first.array.ndim == 2:
            # SimpleITKIO's 2D convention: a single slice with a huge spacing across it.
            image = image[:, None]
            spacing = [max(spacing) * 999, *spacing]
        return image, {"spacing": spacing}

    def segment_array(self, image: np.ndarray, properties: dict, progress: Optional[ProgressCallback] = None,
                      cancel: Optional[Callable[[], bool]] = None,
                      save_probabilities: Optional[PathLike] = None) -> np.ndarray:
        """nnU-Net's ``predict_single_npy_array`` labels, in bounded memory (weights loaded once).

        ``image`` and ``properties`` as nnU-Net's reader gives them (or :meth:`prepare_array`):
        ``(channels, *spatial)`` and ``{"spacing": [...]}`` in that array order. Training label
        values; for callers that hold arrays (the selection's members, the cross-validation).
        """
        from .bounded import predict_bounded

        segmentation = predict_bounded(self._predictor, image, properties, max_memory_gb=self.max_memory_gb,
                                       progress=progress, cancel=cancel, save_probabilities=save_probabilities,
                                       engine=self._engine)
        if self.largest_component:
            segmentation = self._keep_largest_components(segmentation)
        return np.asarray(segmentation)

    def _keep_largest_components(self, segmentation: np.ndarray) -> np.ndarray:
        from nnunetv2.postprocessing.remove_connected_components import (
            remove_all_but_largest_component_from_segmentation,
        )

        for label in self._predictor.label_manager.foreground_labels:
            if np.any(segmentation == label):
                segmentation = remove_all_but_largest_component_from_segmentation(segmentation, int(label))
        return segmentation


# --------------------------------------------------------------------------------------------------
# Command line


def check_folder_cases(input_dir: PathLike, file_ending: str, n_channels: int) -> dict[str, list]:
    """Every case of a folder, each checked by :func:`case_channels` (nothing written before)."""
    return {case_id: case_channels(files, n_channels)
            for case_id, files in find_cases(input_dir, file_ending, n_channels).items()}


def segment_cases(predict: Callable[[list["Volume"]], "Volume"], cases: dict[str, list], output_dir: PathLike,
                  file_ending: str, progress: Optional[ProgressCallback] = None) -> list[Path]:
    """``predict`` (one model's or a selection's) on checked cases, one label map per case written as
    ``output_dir/<case><ending>``, a progress event after each. Returns the written paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (case_id, specs) in enumerate(cases.items()):
        start = time.perf_counter()
        written.append(predict(read_case(specs)).write(output_dir / f"{case_id}{file_ending}"))
        if progress is not None:
            progress(ProgressEvent("progress", {"fraction": (index + 1) / len(cases),
                                                "message": f"segmented {case_id}",
                                                "seconds": time.perf_counter() - start}))
    return written


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment images with a trained model",
        description="Segment one case (-i one file per channel, or one 4D file holding them; -o the label map "
        "file) or a folder of cases in nnU-Net naming (-i FOLDER with <case>_0000.nii.gz ..., -o an output folder).",
    )
    parser.add_argument("--model", required=True, type=Path,
                        help="model folder (nnU-Net results layout), or a selection root (`autonnunet select`)")
    parser.add_argument("-i", "--input", dest="inputs", nargs="+", required=True, type=Path, help="images or a folder")
    parser.add_argument("-o", "--output", required=True, type=Path, help="label map file or output folder")
    parser.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N, mps or cpu")
    parser.add_argument("--mirroring", action="store_true", help="test-time augmentation by mirroring (slower)")
    parser.add_argument("--largest-component", action="store_true", help="keep the largest component per class")
    parser.add_argument("--folds", nargs="+", default=None, help="folds to ensemble (default: all present)")
    parser.add_argument("--checkpoint", default=CHECKPOINT_NAME, help=f"checkpoint name (default {CHECKPOINT_NAME})")
    parser.add_argument("--events", help="append progress events (JSON lines) to this file")
    parser.add_argument("--original-labels", action="store_true",
                        help="write the label values of the training files (when intake renumbered them)")
    parser.add_argument("--max-memory", type=float, default=None, metavar="GB",
                        help="most memory one prediction may add (default: slabs of about 512 MB)")
    parser.add_argument("--engine", default="auto", choices=("auto", "torch", "onnxruntime", "openvino"),
                        help="tile forward pass on CPU (default auto = torch)")
    parser.add_argument("--save-probabilities", type=Path, default=None, metavar="FILE.npy",
                        help="also write the class probabilities (one case only), slab by slab")
    parser.add_argument("--members", nargs="+", default=None, metavar="NAME",
                        help="a selection's ensemble members to use (default: all)")
    parser.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from .devices import resolve_device
    from .folds import parse_folds

    folds = None
    if args.folds is not None:
        folds = ["all"] if [f.lower() for f in args.folds] == ["all"] else parse_folds(args.folds)
    from .selection.archive import is_selection_root

    if is_selection_root(args.model):
        return _predict_selection(args, folds)
    if args.members is not None:
        raise PredictionError(f"{args.model}: --members takes a selection root (selection.json); this is one model")
    # Everything a file or the machine can tell is checked before the model loads (seconds).
    info = check_model_folder(args.model, folds, args.checkpoint)
    folder_mode = len(args.inputs) == 1 and args.inputs[0].is_dir()
    if folder_mode:
        check_output_folder(args.output)
        cases = check_folder_cases(args.inputs[0], info.file_ending, len(info.channel_names))
    else:
        check_output_file(args.output)
        specs = case_channels(args.inputs, len(info.channel_names))
    from .bounded.budget import check_budget_value

    check_budget_value(args.max_memory)
    resolve_device(args.device)  # imports torch: after the checks files alone can answer
    writer = EventWriter(args.events) if args.events else None
    if writer is not None:
        writer.emit("stage", name="predict", message=f"loading the model {args.model}")
    start = time.perf_counter()
    predictor = Predictor(
        args.model, folds=folds, device=args.device, use_mirroring=args.mirroring,
        checkpoint=args.checkpoint, largest_component=args.largest_component,
        max_memory_gb=args.max_memory, engine=args.engine, original_labels=args.original_labels,
    )
    logger.info("model loaded in %.1f s (folds %s, device %s)", time.perf_counter() - start, predictor.folds,
                predictor.device)
    if folder_mode:
        def report(event: ProgressEvent) -> None:
            logger.info("%s (%.2f s)", event.data["message"], event.data["seconds"])
            if writer is not None:
                writer(event)

        if args.save_probabilities is not None:
            raise PredictionError("--save-probabilities takes one case, not a folder")
        written = predictor.predict_cases(cases, args.output, progress=report)
        print(json.dumps([str(p) for p in written]))
    else:
        if writer is not None:
            writer.emit("stage", name="predict", message="segmenting")
        print(predictor.predict(read_case(specs), progress=writer,
                                save_probabilities=args.save_probabilities).write(args.output))
    if writer is not None:
        writer.emit("finished", state="succeeded", message="segmentation written")
    return 0


def _predict_selection(args: argparse.Namespace, folds: Optional[list]) -> int:
    """``predict --model <selection root>``: the selection's members (or ``--members``), folds and
    postprocessing, each member on the bounded path
    (:class:`~AutoNNUNetLib.selection.predictor.Selection`). Test-time mirroring is on with
    ``--mirroring`` only, as for one model."""
    from .bounded.budget import check_budget_value
    from .devices import resolve_device
    from .selection.choose import SelectionResult
    from .selection.predictor import Selection

    unsupported = [flag for flag, given in (("--largest-component", args.largest_component),
                                            ("--save-probabilities", args.save_probabilities is not None),
                                            ("--checkpoint", args.checkpoint != CHECKPOINT_NAME)) if given]
    if unsupported:
        raise PredictionError(f"{args.model}: a selection predicts with its own folds' checkpoints and the "
                              f"postprocessing it selected; {', '.join(unsupported)} take one model folder")
    result = SelectionResult.load(args.model)
    if folds == ["all"] or (folds is not None and any(f not in result.folds for f in folds)):
        raise PredictionError(f"{args.model}: the selection was made on folds {result.folds}; --folds picks "
                              f"among them, got {folds}")
    names = [m["name"] for m in result.members]
    unknown = [m for m in args.members or () if m not in names]
    if unknown:
        raise PredictionError(f"{args.model}: {', '.join(unknown)} is not a member of the selection ({', '.join(names)})")
    first = args.model / result.members[0]["model_dir"]
    info = check_model_folder(first, folds if folds is not None else result.folds)
    folder_mode = len(args.inputs) == 1 and args.inputs[0].is_dir()
    if folder_mode:
        check_output_folder(args.output)
        check_folder_cases(args.inputs[0], info.file_ending, len(info.channel_names))
    else:
        check_output_file(args.output)
        specs = case_channels(args.inputs, len(info.channel_names))
    check_budget_value(args.max_memory)
    resolve_device(args.device)
    writer = EventWriter(args.events) if args.events else None
    if writer is not None:
        writer.emit("stage", name="predict", message=f"loading the selection {args.model}")
    # An ensemble's probability files go beside the output, on the disk the user chose for results,
    # not in a temporary folder that may be small or held in memory (tmpfs).
    selection = Selection(args.model, device=args.device, folds=folds, members=args.members,
                          use_mirroring=bool(args.mirroring), max_memory_gb=args.max_memory, engine=args.engine,
                          original_labels=args.original_labels,
                          scratch_dir=args.output if folder_mode else args.output.parent)
    if writer is not None:
        writer.emit("stage", name="predict", message="segmenting with " + " + ".join(m["name"] for m in selection.members))
    if folder_mode:
        print(json.dumps([str(p) for p in selection.predict_folder(args.inputs[0], args.output, progress=writer)]))
    else:
        print(selection.predict(read_case(specs), progress=writer).write(args.output))
    if writer is not None:
        writer.emit("finished", state="succeeded", message="segmentation written")
    return 0
