"""A configurable nnU-Net trainer: one :class:`~AutoNNUNetLib.config.TrialConfig`, an epoch budget.

:func:`train` is the unit of work of the search: it trains one configuration on the chosen folds up
to ``epochs`` out of a schedule of ``max_epochs`` and returns the validation Dice per class and the
training time. Three properties matter for the search and are why this is not plain
``nnUNetv2_train``:

- The learning-rate schedule always runs against ``max_epochs``. Training to epoch 12 of 1000 is
  the exact prefix of a 1000-epoch run, so a promoted trial resumes from its lower rung's
  checkpoint (``resume_from``) and trains only the extra epochs.
- Validation is in-process: a sliding-window prediction of each validation case in preprocessed
  space and a per-class Dice. nnU-Net's own validation resamples and exports through a spawned
  process pool (about 40 s for two tiny cases on 2 CPU cores), far too slow per trial.
- The model folder it writes is stock: plans whose architecture entry describes the trained
  network, checkpoints that name the stock ``nnUNetTrainer``. ``nnUNetv2_predict`` and SlicerNNUnet
  load it without this package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .config import TrialConfig
from .events import EventWriter, ProgressCallback, ProgressEvent
from .files import atomic_write_text
from .folds import parse_folds
# Re-exported: callers and tests import the trainer's parts from here.
from .nnunet_trainer import (  # noqa: F401
    CHECKPOINT_KEY, SCHEDULES, ConstantLR, CosineAnnealingLR, PolyLR, TrainingError, scale_augmentation_probabilities,
    trainer_class,
)
from .validation import Diverged, Validation, dice_score, validate_fold, write_summary  # noqa: F401
from .workspace import PLANS_NAME, STOCK_TRAINER, Workspace, resolve_device

log = logging.getLogger(__name__)

RECORD_NAME = "autonnunet.json"
CHECKPOINT_NAME = "checkpoint_final.pth"


def model_dir_name(configuration: str = "3d_fullres") -> str:
    """The folder name nnU-Net gives a model: ``<trainer>__<plans>__<configuration>``."""
    return f"{STOCK_TRAINER}__{PLANS_NAME}__{configuration}"


@dataclass
class FoldResult:
    """The outcome of training one fold."""

    fold: int
    epochs: int  # epochs reached in total
    epochs_trained: int  # epochs trained by this call (0 when a checkpoint already had them)
    max_epochs: int
    dice_per_class: dict[str, float]
    mean_dice: float
    train_seconds: float  # cumulative over the resumed rungs
    validation_seconds: float
    setup_seconds: float
    save_seconds: float
    checkpoint: Path
    final_loss: float = float("nan")
    #: Why the run diverged (NaN/Inf loss or output); its Dice is then 0 for every class.
    diverged: Optional[str] = None


@dataclass
class TrainResult:
    """The outcome of training one configuration on one or more folds (means over folds)."""

    config: TrialConfig
    folds: list[FoldResult]
    mean_dice: float
    dice_per_class: dict[str, float]
    train_seconds: float  # summed over folds
    epochs: int
    max_epochs: int
    model_dir: Path
    iterations_per_epoch: int = 250
    #: Set when a fold diverged: the result is Dice 0 (a loss of 1 for the search), with this reason.
    diverged: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "diverged": self.diverged,
            "config": self.config.to_dict(),
            "folds": [{**asdict(f), "checkpoint": str(f.checkpoint)} for f in self.folds],
            "mean_dice": self.mean_dice,
            "dice_per_class": self.dice_per_class,
            "train_seconds": self.train_seconds,
            "epochs": self.epochs,
            "max_epochs": self.max_epochs,
            "iterations_per_epoch": self.iterations_per_epoch,
            "model_dir": str(self.model_dir),
        }


# ----------------------------------------------------------------------------------------------
# training driver


def _with_configuration(config: TrialConfig, configuration: Optional[str]) -> TrialConfig:
    """``config`` in ``configuration`` (None: its own)."""
    if configuration is None or configuration == config.configuration:
        return config
    return config.replace(configuration=configuration)


@contextlib.contextmanager
def _training_environment(device_type: str):
    """Process settings for training that must not leak into the caller's environment."""
    saved = {k: os.environ.get(k) for k in ("nnUNet_n_proc_DA", "nnUNet_compile")}
    if saved["nnUNet_n_proc_DA"] is None and device_type == "cpu":
        # Augmentation in-process: on a CPU the worker processes only compete with training.
        os.environ["nnUNet_n_proc_DA"] = "0"
    if saved["nnUNet_compile"] is None:
        # torch.compile costs minutes of warm-up, more than a short trial trains.
        os.environ["nnUNet_compile"] = "false"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _seed_everything(seed: Optional[int]) -> None:
    if seed is None:
        return
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _read_checkpoint_meta(path: Path) -> dict:
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None:
        raise TrainingError(f"{path} was not written by AutoNNUNet (no '{CHECKPOINT_KEY}' entry); cannot resume it")
    meta = dict(meta)
    meta["epoch"] = int(checkpoint["current_epoch"])
    if "configuration" not in (meta.get("config") or {}):
        # Written before the configuration was a TrialConfig field: nnU-Net's own record of it.
        configuration = (checkpoint.get("init_args") or {}).get("configuration") or "3d_fullres"
        meta["config"] = {**(meta.get("config") or {}), "configuration": configuration}
    return meta


def train_fold(
    workspace: Workspace,
    config: TrialConfig,
    output_dir: Path,
    fold: int,
    *,
    epochs: int,
    max_epochs: int,
    iterations_per_epoch: int = 250,
    resume_from: Optional[Path] = None,
    device: Union[str, Any] = "auto",
    seed: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    configuration: Optional[str] = None,
    max_validation_cases: Optional[int] = None,
) -> FoldResult:
    """Train one fold of ``config`` to ``epochs`` (of a ``max_epochs`` schedule); see :func:`train`."""
    from nnunetv2.utilities.helpers import empty_cache

    from .config import check_planned

    t_setup = time.perf_counter()
    config = _with_configuration(config, configuration)
    configuration = config.configuration
    output_dir = Path(output_dir)
    plans = workspace.load_plans()
    check_planned(plans, [configuration], workspace.preprocessed_dataset)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    from .network import apply_config_to_plans

    dataset_json = workspace.load_dataset_json()
    plans = apply_config_to_plans(plans, config, configuration, dataset_json)
    plans["continue_training"] = resume_from is not None

    resume_checkpoint: Optional[Path] = None
    resume_meta: dict = {}
    if resume_from is not None:
        resume_checkpoint = Path(resume_from) / f"fold_{fold}" / CHECKPOINT_NAME
        if not resume_checkpoint.is_file():
            raise TrainingError(f"cannot resume fold {fold}: {resume_checkpoint} does not exist")
        resume_meta = _read_checkpoint_meta(resume_checkpoint)
        if resume_meta["max_epochs"] != max_epochs:
            raise TrainingError(
                f"cannot resume {resume_checkpoint}: it follows a {resume_meta['max_epochs']}-epoch schedule, "
                f"this run a {max_epochs}-epoch one (the learning rate would not continue exactly)")
        if TrialConfig.from_dict(resume_meta["config"]) != config:
            raise TrainingError(f"cannot resume {resume_checkpoint}: it was trained with another configuration")

    _seed_everything(None if seed is None else seed + fold)
    with workspace.activate(), _training_environment(torch_device.type), \
            tempfile.TemporaryDirectory(prefix=".nnunet-scratch-", dir=output_dir) as scratch:
        # nnU-Net's constructor creates its log folder under nnUNet_results; aim it at scratch
        # space, then relocate the trainer into the requested model folder. The scratch lives in
        # that folder so a killed worker leaves nothing in /tmp (a search's retry wipes the folder).
        os.environ["nnUNet_results"] = scratch
        trainer_cls = trainer_class()
        trainer = trainer_cls(plans, configuration, fold, dataset_json, torch_device)
        trainer.configure(config, max_epochs, iterations_per_epoch)
        trainer.relocate(output_dir, workspace.preprocessed_dataset)
        os.environ["nnUNet_results"] = str(workspace.results)

        if resume_checkpoint is not None:
            trainer.load_checkpoint(str(resume_checkpoint))
            trainer.train_seconds_before = float(resume_meta.get("train_seconds", 0.0))
        trainer.on_train_start()
        start_epoch = trainer.current_epoch
        setup_seconds = time.perf_counter() - t_setup

        train_seconds = 0.0
        last_loss = float("nan")
        diverged: Optional[str] = None
        try:
            for epoch in range(start_epoch, min(epochs, max_epochs)):
                t_epoch = time.perf_counter()
                trainer.on_epoch_start()
                trainer.on_train_epoch_start()
                losses = [trainer.train_step(next(trainer.dataloader_train))["loss"]
                          for _ in range(trainer.num_iterations_per_epoch)]
                trainer.on_train_epoch_end([{"loss": l} for l in losses])
                last_loss = float(np.mean(losses))
                if not math.isfinite(last_loss):
                    # Diverged: no point training on; the run is scored Dice 0 with this reason.
                    diverged = f"training loss became {last_loss} at epoch {epoch + 1} (fold {fold})"
                # Placeholders keep nnU-Net's per-epoch logging lists aligned, so a stock
                # `nnUNetv2_train --c` can still continue from our checkpoint.
                trainer.logger.log("val_losses", float("nan"), epoch)
                trainer.logger.log("mean_fg_dice", float("nan"), epoch)
                trainer.logger.log("dice_per_class_or_region", [], epoch)
                trainer.logger.log("epoch_end_timestamps", time.time(), epoch)
                trainer.current_epoch += 1
                seconds = time.perf_counter() - t_epoch
                train_seconds += seconds
                if progress is not None:
                    progress(ProgressEvent("epoch", {"fold": fold, "epoch": epoch + 1, "max_epochs": max_epochs,
                                                     "target_epochs": epochs, "loss": last_loss,
                                                     "seconds": seconds}))
                if diverged:
                    break
            trainer.train_seconds_before += train_seconds

            t_val = time.perf_counter()
            validation = None
            if diverged is None:
                try:
                    validation = validate_fold(trainer, max_validation_cases)
                except Diverged as error:
                    diverged = f"{error.reason} (fold {fold})"
            if validation is None:
                names = {int(v): k for k, v in dataset_json["labels"].items() if isinstance(v, int)}
                labels = {names.get(l, str(l)): int(l) for l in trainer.label_manager.foreground_labels}
                validation = Validation({name: 0.0 for name in labels}, labels)
                log.warning("fold %s diverged: %s; scored as Dice 0", fold, diverged)
            dice_per_class = validation.dice_per_class
            validation_seconds = time.perf_counter() - t_val

            t_save = time.perf_counter()
            checkpoint = Path(trainer.output_folder) / CHECKPOINT_NAME
            trainer.save_checkpoint(str(checkpoint))
            # What stock nnUNetv2_export_model_to_zip packs besides the checkpoint.
            write_summary(Path(trainer.output_folder), validation, diverged)
            _plot_progress(trainer)
            save_seconds = time.perf_counter() - t_save
        finally:
            # Shut down augmentation workers even when training failed.
            for loader in (trainer.dataloader_train, trainer.dataloader_val):
                if loader is not None and hasattr(loader, "_finish"):
                    loader._finish()
            empty_cache(torch_device)

    scores = [v for v in dice_per_class.values() if not math.isnan(v)]
    return FoldResult(
        fold=fold,
        epochs=trainer.current_epoch,
        epochs_trained=trainer.current_epoch - start_epoch,
        max_epochs=max_epochs,
        dice_per_class=dice_per_class,
        mean_dice=float(np.mean(scores)) if scores else float("nan"),
        train_seconds=trainer.train_seconds_before,
        validation_seconds=validation_seconds,
        setup_seconds=setup_seconds,
        save_seconds=save_seconds,
        checkpoint=checkpoint,
        final_loss=last_loss,
        diverged=diverged,
    )


def _plot_progress(trainer) -> None:
    """nnU-Net's ``progress.png`` (losses, learning rate, epoch times) of the fold."""
    try:
        trainer.logger.plot_progress_png(trainer.output_folder)
    except Exception as error:  # a plot must never fail a training; the export then says what is missing
        log.warning("could not draw %s/progress.png: %s", trainer.output_folder, error)


def train(
    workspace: Workspace,
    config: TrialConfig,
    output_dir: Union[str, Path],
    *,
    folds: Sequence[int] = (0,),
    epochs: int,
    max_epochs: Optional[int] = None,
    iterations_per_epoch: int = 250,
    resume_from: Optional[Union[str, Path]] = None,
    device: Union[str, Any] = "auto",
    seed: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    configuration: Optional[str] = None,
    max_validation_cases: Optional[int] = None,
) -> TrainResult:
    """Train ``config`` on ``folds`` to ``epochs`` epochs of a ``max_epochs`` schedule.

    Args:
        workspace: a planned and preprocessed workspace (:func:`AutoNNUNetLib.fingerprint.plan_and_preprocess`).
        config: hyperparameters and architecture; ``TrialConfig()`` is nnU-Net's default.
        output_dir: the model folder to write (nnU-Net results layout; stock loaders read it).
        folds: cross-validation folds to train; the result holds their means.
        epochs: epoch budget of this call (a search rung).
        max_epochs: the length of the learning-rate schedule (defaults to ``epochs``).
        iterations_per_epoch: nnU-Net uses 250; tests and CPU profiles use a few.
        resume_from: the model folder of a lower budget with the same config and ``max_epochs``;
            only the missing epochs are trained.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cuda``, ``cuda:N``, ``mps`` or ``cpu``.
        progress: receives ``epoch`` events.
        configuration: nnU-Net's configuration (2d, 3d_fullres, 3d_lowres) to train; default
            ``config.configuration``. Given, it replaces the config's (the record says what trained).
        max_validation_cases: validate on at most this many cases of each fold (quick profiles).

    Raises :class:`~AutoNNUNetLib.config.ConfigurationNotPlanned` when the plans lack the
    configuration or its data was not preprocessed.
    """
    config = _with_configuration(config.validate(), configuration)
    configuration = config.configuration
    max_epochs = int(max_epochs or epochs)
    if not 1 <= epochs <= max_epochs:
        raise TrainingError(f"epochs must be in 1..max_epochs ({max_epochs}), got {epochs}")
    if iterations_per_epoch < 1:
        raise TrainingError(f"iterations_per_epoch must be >= 1, got {iterations_per_epoch}")
    folds = [int(f) for f in folds]
    if not folds:
        raise TrainingError("no folds to train")
    from .config import check_planned

    check_planned(workspace.load_plans(), [configuration], workspace.preprocessed_dataset)  # before any file
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for fold in folds:
        results.append(train_fold(
            workspace, config, output_dir, fold, epochs=epochs, max_epochs=max_epochs,
            iterations_per_epoch=iterations_per_epoch, resume_from=resume_from, device=device, seed=seed,
            progress=progress, configuration=configuration, max_validation_cases=max_validation_cases))
    class_names = list(results[0].dice_per_class)
    dice_per_class = {name: float(np.nanmean([r.dice_per_class[name] for r in results])) for name in class_names}
    result = TrainResult(
        config=config,
        folds=results,
        mean_dice=float(np.nanmean([r.mean_dice for r in results])),
        dice_per_class=dice_per_class,
        train_seconds=float(sum(r.train_seconds for r in results)),
        epochs=min(r.epochs for r in results),
        max_epochs=max_epochs,
        model_dir=output_dir,
        iterations_per_epoch=iterations_per_epoch,
        diverged=next((r.diverged for r in results if r.diverged), None),
    )
    record = {"kind": "autonnunet-model", "dataset": workspace.require_dataset(), "configuration": configuration,
              **result.to_dict()}
    atomic_write_text(output_dir / RECORD_NAME, json.dumps(record, indent=2, default=str))
    return result


# ----------------------------------------------------------------------------------------------
# CLI


def load_config_argument(value: Optional[str]) -> TrialConfig:
    """A TrialConfig from a JSON string, a JSON file path, or the default when None."""
    if not value:
        return TrialConfig()
    text = Path(value).read_text() if Path(value).is_file() else value
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise TrainingError(f"--config is neither a JSON file nor JSON text: {error}") from error
    if isinstance(raw, dict) and "config" in raw and isinstance(raw["config"], dict):
        raw = raw["config"]  # accept a model record or a trial record too
    return TrialConfig.from_dict(raw)


def request_from_args(args: argparse.Namespace):
    """The one train request record (:class:`~AutoNNUNetLib.jobs.params.TrainParams`) of the
    flags: ``--request FILE`` if given, the flags overriding it; validated like a server request
    (a seed of 2**32 or 10**30 epochs is refused before anything is loaded)."""
    from .jobs.params import TrainParams

    values = TrainParams.load(args.request).to_dict() if args.request else {}
    for name in ("epochs", "max_epochs", "iterations_per_epoch", "seed", "device"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.folds is not None:
        values["folds"] = "all" if [f.lower() for f in args.folds] == ["all"] else parse_folds(args.folds)
    if "epochs" not in values:
        raise TrainingError("give --epochs (or a --request file holding the training request)")
    return TrainParams.from_dict(values)


def _cmd_train(args: argparse.Namespace) -> int:
    request = request_from_args(args)
    workspace = Workspace(args.workdir, args.dataset)
    config = load_config_argument(args.config) if args.config or request.config is None \
        else TrialConfig.from_dict(request.config)
    output = Path(args.output) if args.output else \
        workspace.results / workspace.require_dataset() / model_dir_name(config.configuration)
    writer = EventWriter(args.events) if args.events else None

    def report(event: ProgressEvent) -> None:
        if writer is not None:
            writer(event)
        if event.kind == "epoch":
            d = event.data
            print(f"fold {d['fold']} epoch {d['epoch']}/{d['target_epochs']} loss {d['loss']:.4f} "
                  f"({d['seconds']:.1f} s)", flush=True)

    if writer is not None:
        writer.emit("stage", name="train", message=f"training {output}")
    result = train(workspace, config, output, folds=parse_folds(request.folds), epochs=request.epochs,
                   max_epochs=request.max_epochs, iterations_per_epoch=request.iterations_per_epoch or 250,
                   resume_from=args.resume_from, device=request.device, seed=request.seed, progress=report,
                   max_validation_cases=args.max_validation_cases)
    dice = ", ".join(f"{k} {v:.4f}" for k, v in result.dice_per_class.items())
    print(f"validation Dice: {dice} (mean {result.mean_dice:.4f}); training {result.train_seconds:.1f} s")
    if result.diverged:
        print(f"the run diverged ({result.diverged}); it is scored as Dice 0")
    print(f"model folder: {result.model_dir}")
    if writer is not None:
        writer.emit("finished", state="succeeded", dice=result.mean_dice, model_dir=str(result.model_dir))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one configuration (default: nnU-Net's) on chosen folds")
    p.add_argument("--workdir", required=True, help="workspace folder (after `autonnunet fingerprint`)")
    p.add_argument("--dataset", help="dataset name when the workspace holds several")
    p.add_argument("--config", help="TrialConfig as JSON text or a JSON file (default: nnU-Net default)")
    p.add_argument("--request", help="a train request (JSON of jobs.params.TrainParams); flags override it")
    p.add_argument("--folds", nargs="+", default=None, help="folds to train, or 'all' (default: 0)")
    p.add_argument("--epochs", type=int, help="epochs to train to (required unless --request gives them)")
    p.add_argument("--max-epochs", type=int, help="length of the LR schedule (default: --epochs)")
    p.add_argument("--iterations-per-epoch", type=int, help="training iterations per epoch (default: 250)")
    p.add_argument("--resume-from", help="model folder of a lower epoch budget to continue")
    p.add_argument("--max-validation-cases", type=int, help="validate on at most this many cases per fold")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, help="random seed, 0 to 2**32-1")
    p.add_argument("--output", help="model folder to write (default: the workspace's nnUNet_results)")
    p.add_argument("--events", help="append progress events (JSON lines) to this file")
    p.set_defaults(func=_cmd_train)
