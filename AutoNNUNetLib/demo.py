"""``autonnunet demo``: the whole pipeline on a generated dataset, no download, minutes on a CPU.

The generated cases look like a small two-channel MRI study: a noisy background, a bright
ellipsoid ("core") inside a larger one ("rim"), at random positions and sizes, on an oblique,
anisotropic grid. The second channel sees the two structures with other contrasts, so both
channels carry information. One extra case is held out of training and segmented at the end; the
demo prints the Dice of that prediction against the generated truth.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UserInputError
from .files import atomic_write_json
from .events import EventWriter, ProgressCallback, ProgressEvent

DEMO_CLASSES = {"background": 0, "rim": 1, "core": 2}
DEMO_CHANNELS = ["T1", "T2"]
DEMO_SHAPE = (32, 40, 40)  # (z, y, x)


@dataclass
class DemoResult:
    dice_per_class: dict[str, float]
    validation_dice: dict[str, float]
    workdir: Path
    model_dir: Path
    seconds: float


def _oblique_direction(angle_degrees: float) -> tuple[float, ...]:
    """A rotation about z, row-major 3x3 (SimpleITK convention)."""
    a = math.radians(angle_degrees)
    return (math.cos(a), -math.sin(a), 0.0, math.sin(a), math.cos(a), 0.0, 0.0, 0.0, 1.0)


DEMO_SPACING = (0.9, 0.9, 1.6)  # (x, y, z) mm


def generate_case(seed: int, shape: tuple[int, int, int] = DEMO_SHAPE,
                  spacing: tuple[float, float, float] = DEMO_SPACING):
    """One synthetic case: two channel volumes and a label volume with the same geometry.

    ``shape`` (z, y, x) and ``spacing`` (x, y, z, mm) change the grid; the structures keep their
    place relative to it (positions and radii scale with ``shape``), so a thick-slice grid such as
    ``shape=(12, 64, 64), spacing=(0.8, 0.8, 6.5)`` gives strongly anisotropic cases.
    """
    from .imaging import Geometry, Volume

    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    scale = np.array(shape, dtype=np.float64) / np.array(DEMO_SHAPE, dtype=np.float64)  # 1 for the demo's grid
    center = np.array(shape, dtype=np.float32) / 2 + rng.uniform(-4, 4, size=3) * scale
    radii = rng.uniform(7, 11, size=3) * scale
    distance = np.sqrt(((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2
                       + ((x - center[2]) / radii[2]) ** 2)
    label = np.zeros(shape, dtype=np.uint8)
    label[distance < 1.0] = DEMO_CLASSES["rim"]
    label[distance < 0.5] = DEMO_CLASSES["core"]

    t1 = rng.normal(100, 15, size=shape).astype(np.float32)
    t1[label == 1] += 120
    t1[label == 2] += 260
    t2 = rng.normal(300, 25, size=shape).astype(np.float32)
    t2[label == 1] -= 150
    t2[label == 2] += 100
    geometry = Geometry(spacing=spacing, origin=(-20.0 + seed, 12.5, -7.0),
                        direction=_oblique_direction(10.0 + 3 * seed))
    return [Volume(t1, geometry), Volume(t2, geometry)], Volume(label, geometry)


def generate_source(n_cases: int = 10, seed: int = 0, shape: tuple[int, int, int] = DEMO_SHAPE,
                    spacing: tuple[float, float, float] = DEMO_SPACING):
    """A :class:`~AutoNNUNetLib.dataset.records.DatasetSource` of ``n_cases`` generated two-channel cases."""
    from .dataset.records import Case, DatasetSource

    cases = []
    for i in range(n_cases):
        channels, label = generate_case(seed + i, shape, spacing)
        cases.append(Case(case_id=f"demo_{i:03d}", channels=channels, label=label))
    return DatasetSource(cases=cases, classes=dict(DEMO_CLASSES), channel_names=list(DEMO_CHANNELS))


def dice_scores(prediction: np.ndarray, truth: np.ndarray, classes: dict[str, int]) -> dict[str, float]:
    scores = {}
    for name, value in classes.items():
        if value == 0:
            continue
        p, t = prediction == value, truth == value
        denominator = p.sum() + t.sum()
        scores[name] = float(2 * np.logical_and(p, t).sum() / denominator) if denominator else float("nan")
    return scores


def run_demo(
    workdir: Path,
    n_cases: int = 10,
    epochs: int = 10,
    iterations_per_epoch: int = 15,
    device: str = "auto",
    progress: Optional[ProgressCallback] = None,
) -> DemoResult:
    """dataset -> fingerprint -> train -> predict on a held-out generated case."""
    from .config import TrialConfig
    from .dataset.build import build_dataset
    from .fingerprint import plan_and_preprocess
    from .inference import Predictor
    from .trainer import model_dir_name, train
    from .dataset.validate import MIN_CASES
    from .workspace import Workspace

    if isinstance(n_cases, bool) or not isinstance(n_cases, int) or n_cases < MIN_CASES:
        # Refused before anything is generated: nnU-Net's 5-fold split fails after preprocessing.
        raise UserInputError(f"--cases {n_cases}: the demo needs at least {MIN_CASES} cases for nnU-Net's "
                             "5-fold cross-validation split")
    emit = progress or (lambda event: None)
    start = time.perf_counter()
    workspace = Workspace(workdir)
    emit(ProgressEvent("stage", {"name": "dataset", "message": f"generating {n_cases} two-channel cases"}))
    build_dataset(generate_source(n_cases), workspace, dataset_id=1, name="Demo", overwrite=True)
    emit(ProgressEvent("stage", {"name": "fingerprint", "message": "nnU-Net fingerprint, plans, preprocessing"}))
    summary = plan_and_preprocess(workspace)
    emit(ProgressEvent("stage", {"name": "fingerprint", "message": summary.to_text()}))
    emit(ProgressEvent("stage", {"name": "train", "message": f"{epochs} epochs x {iterations_per_epoch} iterations"}))
    model_dir = workspace.results / workspace.require_dataset() / model_dir_name()
    result = train(workspace, TrialConfig(), model_dir, folds=[0], epochs=epochs,
                   iterations_per_epoch=iterations_per_epoch, device=device, seed=0, progress=progress)
    emit(ProgressEvent("stage", {"name": "predict", "message": "segmenting a held-out generated case"}))
    channels, truth = generate_case(seed=10_000)
    predictor = Predictor(model_dir, device=device)
    prediction = predictor.predict(channels)
    if prediction.array.shape != truth.array.shape or prediction.geometry != truth.geometry:
        raise RuntimeError("the prediction is not on the input's grid")  # the predictor's contract
    scores = dice_scores(prediction.array, truth.array, DEMO_CLASSES)
    return DemoResult(dice_per_class=scores, validation_dice=result.dice_per_class, workdir=workspace.root,
                      model_dir=model_dir, seconds=time.perf_counter() - start)


def _cmd_demo(args: argparse.Namespace) -> int:
    writer = EventWriter(args.events) if args.events else None

    def report(event: ProgressEvent) -> None:
        if writer is not None:
            writer(event)
        if event.kind == "stage":
            print(f"[{event.data['name']}] {event.data.get('message', '')}", flush=True)
        elif event.kind == "epoch":
            d = event.data
            print(f"  epoch {d['epoch']}/{d['target_epochs']}  loss {d['loss']:.4f}  ({d['seconds']:.1f} s)",
                  flush=True)

    result = run_demo(Path(args.workdir), n_cases=args.cases, epochs=args.epochs,
                      iterations_per_epoch=args.iterations_per_epoch, device=args.device, progress=report)
    print()
    print("Dice of the held-out case against the generated truth:")
    for name, score in result.dice_per_class.items():
        print(f"  {name:<6} {score:.3f}")
    print(f"model folder: {result.model_dir}")
    print(f"total time: {result.seconds:.0f} s")
    if args.json:
        atomic_write_json(args.json, {"dice": result.dice_per_class, "validation_dice": result.validation_dice,
                                      "seconds": result.seconds, "model_dir": str(result.model_dir)})
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("demo", help="generate a small dataset, train briefly, segment a new case")
    p.add_argument("--workdir", default="autonnunet-demo", help="folder for the demo's workspace (default: %(default)s)")
    p.add_argument("--cases", type=int, default=10, help="generated training cases")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--iterations-per-epoch", type=int, default=15)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--events", help="append progress events (JSON lines) to this file")
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.set_defaults(func=_cmd_demo)
