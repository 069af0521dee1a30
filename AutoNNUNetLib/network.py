"""From a :class:`~AutoNNUNetLib.config.TrialConfig` to the network nnU-Net builds.

The searched architecture is written into the plans' ``architecture`` entry (a
dynamic_network_architectures class name plus its keyword arguments). That entry is all stock
nnU-Net needs to rebuild the network, so a model trained here loads in ``nnUNetv2_predict`` and
SlicerNNUnet with the stock trainer name and none of our code installed.

What the planner decided stays: kernel sizes, strides (so the patch size stays divisible by the
total downsampling) and the patch and batch size. The configuration changes the block type, the
number of blocks per stage, the number of stages (HNAS keeps the first ``n_stages`` of the
planner's stages), the feature widths, activation, normalization and dropout.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from .config import MODEL_SCALES, TrialConfig

PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESIDUAL_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"

#: nnU-Net's ResEnc presets (M, L, XL share these block counts; they differ in memory target).
RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6)
RESENC_DECODER_CONVS = 1
PLAIN_CONVS_PER_STAGE = 2

_ACTIVATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "LeakyReLU": ("torch.nn.LeakyReLU", {"inplace": True}),
    "ReLU": ("torch.nn.ReLU", {"inplace": True}),
    "ELU": ("torch.nn.ELU", {"inplace": True}),
    "GELU": ("torch.nn.GELU", {}),
    "PReLU": ("torch.nn.PReLU", {}),
}
_NORMS = {
    "InstanceNorm": "torch.nn.modules.instancenorm.InstanceNorm{d}d",
    "BatchNorm": "torch.nn.modules.batchnorm.BatchNorm{d}d",
}
_DROPOUT = "torch.nn.modules.dropout.Dropout{d}d"


class NetworkError(ValueError):
    """The configuration cannot be turned into a network for these plans."""


def default_stage_count(plans: dict, configuration: str = "3d_fullres") -> int:
    """How many resolution stages nnU-Net's planner chose."""
    return int(plans["configurations"][configuration]["architecture"]["arch_kwargs"]["n_stages"])


def default_encoder_blocks(n_stages: int, encoder_type: str = "conv") -> list[int]:
    """nnU-Net's blocks (plain: convolutions) per encoder stage for each encoder type."""
    if encoder_type == "residual":
        return list(RESENC_BLOCKS_PER_STAGE[:n_stages])
    return [PLAIN_CONVS_PER_STAGE] * n_stages


def default_decoder_blocks(n_stages: int, encoder_type: str = "conv") -> list[int]:
    per_stage = RESENC_DECODER_CONVS if encoder_type == "residual" else PLAIN_CONVS_PER_STAGE
    return [per_stage] * (n_stages - 1)


def architecture_kwargs(plans: dict, config: TrialConfig, configuration: str = "3d_fullres") -> tuple[str, dict]:
    """The dynamic_network_architectures class name and kwargs (as plans store them) for ``config``."""
    config.validate()
    try:
        planned = plans["configurations"][configuration]["architecture"]["arch_kwargs"]
    except KeyError as error:
        raise NetworkError(f"plans have no architecture for configuration {configuration!r}") from error
    dims = len(planned["kernel_sizes"][0])
    planned_stages = int(planned["n_stages"])
    n_stages = planned_stages if config.n_stages is None else int(config.n_stages)
    if not 1 <= n_stages <= planned_stages:
        raise NetworkError(f"n_stages={n_stages} is outside 1..{planned_stages} (the planner's stage count)")

    if config.blocks_per_stage_encoder is not None:
        encoder_blocks = [int(b) for b in config.blocks_per_stage_encoder]
    else:
        scale = MODEL_SCALES[int(config.model_scale)]
        # Half of one block rounds up: every stage keeps at least one block.
        encoder_blocks = [max(1, math.ceil(b * scale)) for b in default_encoder_blocks(n_stages, config.encoder_type)]
    decoder_blocks = (
        [int(b) for b in config.blocks_per_stage_decoder]
        if config.blocks_per_stage_decoder is not None
        else default_decoder_blocks(n_stages, config.encoder_type)
    )
    if len(encoder_blocks) != n_stages:
        raise NetworkError(f"blocks_per_stage_encoder has {len(encoder_blocks)} entries, expected {n_stages}")
    if len(decoder_blocks) != n_stages - 1:
        raise NetworkError(f"blocks_per_stage_decoder has {len(decoder_blocks)} entries, expected {n_stages - 1}")

    features = [min(config.max_features, config.base_num_features * 2**i) for i in range(n_stages)]
    nonlin, nonlin_kwargs = _ACTIVATIONS[config.activation]
    kwargs: dict[str, Any] = {
        "n_stages": n_stages,
        "features_per_stage": features,
        "conv_op": planned["conv_op"],
        "kernel_sizes": copy.deepcopy(planned["kernel_sizes"][:n_stages]),
        "strides": copy.deepcopy(planned["strides"][:n_stages]),
    }
    if config.encoder_type == "residual":
        class_name = RESIDUAL_UNET
        kwargs["n_blocks_per_stage"] = encoder_blocks
    else:
        class_name = PLAIN_UNET
        kwargs["n_conv_per_stage"] = encoder_blocks
    kwargs.update(
        {
            "n_conv_per_stage_decoder": decoder_blocks,
            "conv_bias": True,
            "norm_op": _NORMS[config.normalization].format(d=dims),
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": _DROPOUT.format(d=dims) if config.dropout_rate > 0 else None,
            "dropout_op_kwargs": {"p": float(config.dropout_rate)} if config.dropout_rate > 0 else None,
            "nonlin": nonlin,
            "nonlin_kwargs": dict(nonlin_kwargs),
        }
    )
    return class_name, kwargs


def apply_config_to_plans(plans: dict, config: TrialConfig, configuration: str = "3d_fullres") -> dict:
    """A copy of ``plans`` whose ``configuration`` entry describes the network of ``config``."""
    class_name, kwargs = architecture_kwargs(plans, config, configuration)
    new_plans = copy.deepcopy(plans)
    new_plans["configurations"][configuration]["architecture"] = {
        "network_class_name": class_name,
        "arch_kwargs": kwargs,
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    return new_plans


def build_network(
    plans: dict,
    dataset_json: dict,
    config: TrialConfig,
    configuration: str = "3d_fullres",
    deep_supervision: bool = True,
):
    """Instantiate the network of ``config`` exactly as stock nnU-Net would from the new plans."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(apply_config_to_plans(plans, config, configuration))
    conf = manager.get_configuration(configuration)
    label_manager = manager.get_label_manager(dataset_json)
    return get_network_from_plans(
        conf.network_arch_class_name,
        conf.network_arch_init_kwargs,
        conf.network_arch_init_kwargs_req_import,
        determine_num_input_channels(manager, conf, dataset_json),
        label_manager.num_segmentation_heads,
        allow_init=True,
        deep_supervision=deep_supervision,
    )
