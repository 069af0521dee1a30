"""The nnU-Net trainer subclass a trial trains with, and its learning-rate schedules.

:func:`trainer_class` defines ``AutoNNUNetTrainer`` (a stock ``nnUNetTrainer`` whose optimizer,
schedule, loss and augmentation strength come from a :class:`~AutoNNUNetLib.config.TrialConfig`)
lazily, because importing nnunetv2 costs seconds. Its checkpoints name the stock trainer, so
stock nnU-Net loads them; our metadata rides along under :data:`CHECKPOINT_KEY`. The driver that
trains folds with it is :mod:`AutoNNUNetLib.trainer`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .config import TrialConfig
from .errors import AutoNNUNetError
from .workspace import STOCK_TRAINER

#: Extra key in our checkpoints; stock nnU-Net ignores unknown keys.
CHECKPOINT_KEY = "autonnunet"


class TrainingError(AutoNNUNetError, RuntimeError):
    """A training run could not start or did not finish (bad resume, NaN loss, ...)."""


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


def trainer_class():
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
