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

from .errors import AutoNNUNetError
from .config import TrialConfig
from .events import EventWriter, ProgressCallback, ProgressEvent
from .workspace import PLANS_NAME, STOCK_TRAINER, Workspace, resolve_device

log = logging.getLogger(__name__)

RECORD_NAME = "autonnunet.json"
CHECKPOINT_NAME = "checkpoint_final.pth"
#: Extra key in our checkpoints; stock nnU-Net ignores unknown keys.
CHECKPOINT_KEY = "autonnunet"


class TrainingError(AutoNNUNetError, RuntimeError):
    """A training run could not start or did not finish (bad resume, NaN loss, ...)."""


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

    def to_dict(self) -> dict[str, Any]:
        return {
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
# learning-rate schedules with nnU-Net's "step(epoch)" contract (stateless, so resume is exact)


class _EpochSchedule:
    def __init__(self, optimizer, initial_lr: float, max_epochs: int):
        self.optimizer = optimizer
        self.initial_lr = initial_lr
        self.max_epochs = max_epochs

    def lr_at(self, epoch: int) -> float:
        raise NotImplementedError

    def step(self, epoch: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(epoch)


class PolyLR(_EpochSchedule):
    """nnU-Net's default: ``lr0 * (1 - epoch / max_epochs) ** 0.9``."""

    def lr_at(self, epoch: int) -> float:
        return self.initial_lr * (1 - epoch / self.max_epochs) ** 0.9


class CosineAnnealingLR(_EpochSchedule):
    def lr_at(self, epoch: int) -> float:
        return 0.5 * self.initial_lr * (1 + math.cos(math.pi * epoch / self.max_epochs))


class ConstantLR(_EpochSchedule):
    def lr_at(self, epoch: int) -> float:
        return self.initial_lr


SCHEDULES = {"PolyLR": PolyLR, "CosineAnnealing": CosineAnnealingLR, "none": ConstantLR}


# ----------------------------------------------------------------------------------------------
# the nnU-Net trainer subclass


def _trainer_class():
    """Define the trainer lazily: importing nnunetv2 costs seconds, the CLI's --help should not."""
    import torch
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss, DC_and_topk_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.helpers import softmax_helper_dim1

    class AutoNNUNetTrainer(nnUNetTrainer):
        """nnUNetTrainer whose hyperparameters come from a TrialConfig (see module docstring).

        The constructor keeps nnU-Net's exact signature: the base class records its own arguments
        by name, so extra parameters would break it. Configure with :meth:`configure` before
        :meth:`initialize`.
        """

        #: Class attribute: the base constructor already logs before ours runs.
        echo_to_console = False

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.trial_config = TrialConfig()
            self.train_seconds_before = 0.0

        def configure(self, config: TrialConfig, max_epochs: int, iterations_per_epoch: int) -> None:
            self.trial_config = config.validate()
            self.initial_lr = config.initial_lr
            self.weight_decay = config.weight_decay
            self.oversample_foreground_percent = config.oversample_foreground_percent
            self.num_epochs = int(max_epochs)
            self.num_iterations_per_epoch = int(iterations_per_epoch)
            # Checkpoints are written by train() when a budget ends, not every 50 epochs.
            self.save_every = 10**9

        def relocate(self, output_folder_base: Path, preprocessed_base: Path) -> None:
            """Write into ``output_folder_base`` instead of nnU-Net's results tree."""
            self.output_folder_base = str(output_folder_base)
            self.output_folder = str(output_folder_base / f"fold_{self.fold}")
            self.preprocessed_dataset_folder_base = str(preprocessed_base)
            self.preprocessed_dataset_folder = str(preprocessed_base / self.configuration_manager.data_identifier)
            os.makedirs(self.output_folder, exist_ok=True)
            self.log_file = os.path.join(self.output_folder, "training_log.txt")

        def print_to_log_file(self, *args, also_print_to_console=True, add_timestamp=True):
            # nnU-Net echoes everything (plans, citation) to stdout; keep it in the log file only
            # unless asked, so the CLI's progress stays readable.
            super().print_to_log_file(*args, also_print_to_console=self.echo_to_console and also_print_to_console,
                                      add_timestamp=add_timestamp)

        def configure_optimizers(self):
            config = self.trial_config
            params = self.network.parameters()
            if config.optimizer == "SGD":
                optimizer = torch.optim.SGD(params, config.initial_lr, weight_decay=config.weight_decay,
                                            momentum=config.momentum, nesterov=True)
            elif config.optimizer == "Adam":
                optimizer = torch.optim.Adam(params, config.initial_lr, weight_decay=config.weight_decay)
            else:
                optimizer = torch.optim.AdamW(params, config.initial_lr, weight_decay=config.weight_decay)
            return optimizer, SCHEDULES[config.lr_scheduler](optimizer, config.initial_lr, self.num_epochs)

        def _build_loss(self):
            if self.label_manager.has_regions:
                return super()._build_loss()
            config = self.trial_config
            ignore = self.label_manager.ignore_label
            dice_kwargs = {"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5, "do_bg": False,
                           "ddp": self.is_ddp}
            if config.loss == "Dice+CE":
                loss = DC_and_CE_loss(dice_kwargs, {}, weight_ce=1, weight_dice=1, ignore_label=ignore,
                                      dice_class=MemoryEfficientSoftDiceLoss)
            elif config.loss == "TopK10":
                # nnU-Net's TopK loss: cross-entropy over the hardest 10% of voxels, plus Dice.
                loss = DC_and_topk_loss(dice_kwargs, {"k": 10, "ignore_index": -100 if ignore is None else ignore},
                                        weight_ce=1, weight_dice=1, ignore_label=ignore)
            elif config.loss == "CE":
                loss = RobustCrossEntropyLoss(ignore_index=-100 if ignore is None else ignore)
            else:
                if ignore is not None:
                    raise TrainingError("the Dice-only loss does not support datasets with an ignore label")
                loss = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, **dice_kwargs)
            if self.enable_deep_supervision:
                scales = self._get_deep_supervision_scales()
                weights = np.array([1 / (2**i) for i in range(len(scales))])
                weights[-1] = 0  # as nnU-Net: the lowest resolution output does not count
                if weights.sum() == 0:  # a one- or two-stage network (HNAS) has no other output
                    weights[0] = 1
                loss = DeepSupervisionWrapper(loss, weights / weights.sum())
            return loss

        def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                    do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                    foreground_labels=None, regions=None, ignore_label=None):
            # Defined as a method (the base has a staticmethod; calls go through self), so the
            # augmentation factor of this trial can scale nnU-Net's own pipeline.
            transforms = nnUNetTrainer.get_training_transforms(
                patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
                use_mask_for_norm=use_mask_for_norm, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
                regions=regions, ignore_label=ignore_label)
            scale_augmentation_probabilities(transforms, self.trial_config.aug_factor)
            return transforms

        def save_checkpoint(self, filename: str) -> None:
            network = self.network._orig_mod if hasattr(self.network, "_orig_mod") else self.network
            checkpoint = {
                "network_weights": network.state_dict(),
                "optimizer_state": self.optimizer.state_dict(),
                "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
                "logging": self.logger.get_checkpoint(),
                "_best_ema": self._best_ema,
                "current_epoch": self.current_epoch,
                "init_args": self.my_init_kwargs,
                # The stock name: stock nnU-Net rebuilds the network from the plans through it.
                "trainer_name": STOCK_TRAINER,
                "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
                CHECKPOINT_KEY: {
                    "config": self.trial_config.to_dict(),
                    "max_epochs": self.num_epochs,
                    "iterations_per_epoch": self.num_iterations_per_epoch,
                    "train_seconds": self.train_seconds_before,
                },
            }
            tmp = filename + ".tmp"
            torch.save(checkpoint, tmp)
            os.replace(tmp, filename)  # never leave a truncated checkpoint behind

    return AutoNNUNetTrainer


def scale_augmentation_probabilities(transform: Any, factor: float) -> int:
    """Multiply every augmentation probability in a batchgeneratorsv2 pipeline by ``factor``.

    Probabilities are capped at 1. Returns how many probabilities were scaled (for tests and logs).
    Walks ``ComposeTransforms.transforms``, ``RandomTransform.apply_probability`` and the
    ``p_*`` attributes of ``SpatialTransform``.
    """
    count = 0
    if factor == 1.0:
        return 0
    stack = [transform]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for name, value in list(vars(node).items()) if hasattr(node, "__dict__") else []:
            if (name == "apply_probability" or name.startswith("p_")) and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                setattr(node, name, float(min(1.0, value * factor)))
                count += 1
            elif isinstance(value, (list, tuple)):
                stack.extend(v for v in value if hasattr(v, "__dict__"))
            elif hasattr(value, "__dict__") and type(value).__module__.startswith("batchgeneratorsv2"):
                stack.append(value)
    return count


# ----------------------------------------------------------------------------------------------
# training driver


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
    return meta


def _dice(prediction: np.ndarray, truth: np.ndarray, label: int) -> float:
    p = prediction == label
    t = truth == label
    denominator = p.sum() + t.sum()
    if denominator == 0:
        return float("nan")  # class absent in both: no information, left out of the mean
    return float(2.0 * np.logical_and(p, t).sum() / denominator)


def validate_fold(trainer, max_cases: Optional[int] = None) -> dict[str, float]:
    """Per-class Dice of the fold's validation cases, predicted in-process in preprocessed space."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    _, val_keys = trainer.do_split()
    val_keys = sorted(val_keys)[:max_cases] if max_cases else sorted(val_keys)
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, val_keys)
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=trainer.device.type == "cuda", device=trainer.device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, STOCK_TRAINER, trainer.inference_allowed_mirroring_axes)
    labels = trainer.label_manager.foreground_labels
    names = {int(v): k for k, v in trainer.dataset_json["labels"].items() if isinstance(v, int)}
    per_class: dict[str, list[float]] = {names.get(l, str(l)): [] for l in labels}
    with torch.no_grad():
        for key in val_keys:
            data, seg, _, _ = dataset.load_case(key)
            logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data)))
            prediction = logits.argmax(0).cpu().numpy()
            truth = np.asarray(seg)[0]
            for label in labels:
                score = _dice(prediction, truth, label)
                if not math.isnan(score):
                    per_class[names.get(label, str(label))].append(score)
    trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    return {name: (float(np.mean(scores)) if scores else float("nan")) for name, scores in per_class.items()}


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
    configuration: str = "3d_fullres",
    max_validation_cases: Optional[int] = None,
) -> FoldResult:
    """Train one fold of ``config`` to ``epochs`` (of a ``max_epochs`` schedule); see :func:`train`."""
    from nnunetv2.utilities.helpers import empty_cache

    t_setup = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    plans = workspace.load_plans()
    if configuration not in plans["configurations"]:
        raise TrainingError(f"the plans have no configuration {configuration!r} "
                            f"(available: {', '.join(plans['configurations'])})")
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
        trainer_cls = _trainer_class()
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
                    raise TrainingError(f"training loss became {last_loss} at epoch {epoch} (fold {fold})")
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
            trainer.train_seconds_before += train_seconds

            t_val = time.perf_counter()
            dice_per_class = validate_fold(trainer, max_validation_cases)
            validation_seconds = time.perf_counter() - t_val

            t_save = time.perf_counter()
            checkpoint = Path(trainer.output_folder) / CHECKPOINT_NAME
            trainer.save_checkpoint(str(checkpoint))
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
    )


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
    configuration: str = "3d_fullres",
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
        max_validation_cases: validate on at most this many cases of each fold (quick profiles).
    """
    config = config.validate()
    max_epochs = int(max_epochs or epochs)
    if not 1 <= epochs <= max_epochs:
        raise TrainingError(f"epochs must be in 1..max_epochs ({max_epochs}), got {epochs}")
    if iterations_per_epoch < 1:
        raise TrainingError(f"iterations_per_epoch must be >= 1, got {iterations_per_epoch}")
    folds = [int(f) for f in folds]
    if not folds:
        raise TrainingError("no folds to train")
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
    )
    record = {"kind": "autonnunet-model", "dataset": workspace.require_dataset(), "configuration": configuration,
              **result.to_dict()}
    tmp = output_dir / (RECORD_NAME + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, output_dir / RECORD_NAME)
    return result


# ----------------------------------------------------------------------------------------------
# CLI


def parse_folds(values: Sequence[str]) -> list[int]:
    """``["0", "1"]`` -> [0, 1]; ``["all"]`` -> the five cross-validation folds."""
    if len(values) == 1 and str(values[0]).lower() == "all":
        return [0, 1, 2, 3, 4]
    try:
        folds = [int(v) for v in values]
    except ValueError as error:
        raise TrainingError(f"folds must be integers or 'all', got {' '.join(values)}") from error
    if any(f < 0 for f in folds):
        raise TrainingError(f"folds must be >= 0, got {folds}")
    return folds


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


def _cmd_train(args: argparse.Namespace) -> int:
    workspace = Workspace(args.workdir, args.dataset)
    config = load_config_argument(args.config)
    output = Path(args.output) if args.output else workspace.results / workspace.require_dataset() / model_dir_name()
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
    result = train(workspace, config, output, folds=parse_folds(args.folds), epochs=args.epochs,
                   max_epochs=args.max_epochs, iterations_per_epoch=args.iterations_per_epoch,
                   resume_from=args.resume_from, device=args.device, seed=args.seed, progress=report,
                   max_validation_cases=args.max_validation_cases)
    dice = ", ".join(f"{k} {v:.4f}" for k, v in result.dice_per_class.items())
    print(f"validation Dice: {dice} (mean {result.mean_dice:.4f}); training {result.train_seconds:.1f} s")
    print(f"model folder: {result.model_dir}")
    if writer is not None:
        writer.emit("finished", state="succeeded", dice=result.mean_dice, model_dir=str(result.model_dir))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one configuration (default: nnU-Net's) on chosen folds")
    p.add_argument("--workdir", required=True, help="workspace folder (after `autonnunet fingerprint`)")
    p.add_argument("--dataset", help="dataset name when the workspace holds several")
    p.add_argument("--config", help="TrialConfig as JSON text or a JSON file (default: nnU-Net default)")
    p.add_argument("--folds", nargs="+", default=["0"], help="folds to train, or 'all' (default: 0)")
    p.add_argument("--epochs", type=int, required=True, help="epochs to train to")
    p.add_argument("--max-epochs", type=int, help="length of the LR schedule (default: --epochs)")
    p.add_argument("--iterations-per-epoch", type=int, default=250)
    p.add_argument("--resume-from", help="model folder of a lower epoch budget to continue")
    p.add_argument("--max-validation-cases", type=int, help="validate on at most this many cases per fold")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int)
    p.add_argument("--output", help="model folder to write (default: the workspace's nnUNet_results)")
    p.add_argument("--events", help="append progress events (JSON lines) to this file")
    p.set_defaults(func=_cmd_train)
