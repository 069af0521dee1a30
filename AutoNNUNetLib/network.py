"""From a :class:`~AutoNNUNetLib.config.TrialConfig` to the network nnU-Net builds.

The searched architecture is written into the plans' ``architecture`` entry (a
dynamic_network_architectures class name plus its keyword arguments). That entry is all stock
nnU-Net needs to rebuild the network, so a model trained here loads in ``nnUNetv2_predict`` and
SlicerNNUnet with the stock trainer name and none of our code installed.

What the planner decided stays: kernel sizes and strides (so the patch size stays divisible by
the total downsampling). The configuration changes the block type, the number of blocks per stage,
the number of stages (HNAS keeps the first ``n_stages`` of the planner's stages), the feature
widths, activation, normalization and dropout. Patch and batch size then follow nnU-Net's memory
rule for the chosen network (:func:`fit_patch_and_batch`): a network bigger than the planned one
gets a smaller batch (and, when even the minimum batch does not fit, a smaller patch), a smaller
one a larger batch, within nnU-Net's 5%-of-the-dataset cap. nnU-Net's default network keeps the
planner's values exactly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .errors import AutoNNUNetError
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


class NetworkError(AutoNNUNetError, ValueError):
    """The configuration cannot be turned into a network for these plans."""


def default_stage_count(plans: dict, configuration: str = "3d_fullres") -> int:
    """How many resolution stages nnU-Net's planner chose."""
    return int(plans["configurations"][configuration]["architecture"]["arch_kwargs"]["n_stages"])


def default_encoder_blocks(n_stages: int, encoder_type: str = "conv") -> list[int]:
    """nnU-Net's blocks (plain: convolutions) per encoder stage for each encoder type.

    The one rule for the network builder and the HNAS space alike: ResEnc's preset lists 10
    stages; deeper plans repeat its last count (6), as nnU-Net's ResEnc planners do.
    """
    if encoder_type == "residual":
        last = len(RESENC_BLOCKS_PER_STAGE) - 1
        return [RESENC_BLOCKS_PER_STAGE[min(i, last)] for i in range(n_stages)]
    return [PLAIN_CONVS_PER_STAGE] * n_stages


def default_decoder_blocks(n_stages: int, encoder_type: str = "conv") -> list[int]:
    per_stage = RESENC_DECODER_CONVS if encoder_type == "residual" else PLAIN_CONVS_PER_STAGE
    return [per_stage] * (n_stages - 1)


def architecture_kwargs(plans: dict, config: TrialConfig, configuration: Optional[str] = None) -> tuple[str, dict]:
    """The dynamic_network_architectures class name and kwargs (as plans store them) for ``config``.

    ``configuration`` defaults to the config's own. Everything dimension-dependent (convolution,
    normalization and dropout operators, kernel sizes, strides) comes from that configuration's
    plans, so the same searched choices build a valid 2d network as well as a 3d one.
    """
    config.validate()
    configuration = configuration or config.configuration
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


# nnU-Net's default planner (ExperimentPlanner) measures a network by the summed size of its
# convolution feature maps for one patch and compares it with reference values measured for a
# batch of 2 (3D) or 12 (2D) on an 8 GB GPU. These are its constants.
_REFERENCE_FEATURE_MAP = {2: 85_000_000, 3: 560_000_000}
_REFERENCE_BATCH = {2: 12, 3: 2}
_REFERENCE_GB = 8.0
_MIN_BATCH = 2
_MAX_DATASET_COVERED = 0.05  # one batch sees at most 5% of the dataset's voxels (overfitting guard)
_MIN_BOTTLENECK_EDGE = 4  # the planner's UNet_featuremap_min_edge_length


@dataclass(frozen=True)
class PatchAndBatch:
    """What the memory rule chose for one network."""

    patch_size: list[int]
    batch_size: int
    feature_map_size: float  # nnU-Net's memory estimate for one patch
    budget: float  # the same estimate's limit for the GPU memory target


def feature_map_size(class_name: str, kwargs: dict, patch_size: Sequence[int], input_channels: int,
                     output_channels: int) -> float:
    """nnU-Net's memory estimate of a network: its convolution feature maps for one patch."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    network = get_network_from_plans(class_name, kwargs, ["conv_op", "norm_op", "dropout_op", "nonlin"],
                                     input_channels, output_channels, allow_init=False)
    return float(network.compute_conv_feature_map_size(list(patch_size)))


def fit_patch_and_batch(plans: dict, dataset_json: dict, class_name: str, kwargs: dict,
                        configuration: str = "3d_fullres", gpu_memory_gb: float = _REFERENCE_GB) -> PatchAndBatch:
    """Patch and batch size for a network by nnU-Net's planning rule, keeping the planner's topology.

    As nnU-Net's planner: while two patches do not fit the memory target, shrink the patch axis that
    is largest relative to the median image shape by one downsampling step; then take the largest
    batch that fits, capped at 5% of the dataset's voxels and at least 2. Unlike the planner, the
    strides stay as planned (the searched stage count uses them), so an axis only shrinks while its
    bottleneck edge stays at least 4 voxels.
    """
    planned = plans["configurations"][configuration]
    dims = len(planned["patch_size"])
    patch = [int(v) for v in planned["patch_size"]]
    median = [float(v) for v in planned["median_image_size_in_voxels"]]
    divisor = [math.prod(int(stride[axis]) for stride in kwargs["strides"]) for axis in range(dims)]
    input_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    output_channels = len(dataset_json["labels"])
    budget = _REFERENCE_FEATURE_MAP[dims] * gpu_memory_gb / _REFERENCE_GB
    reference_batch = _REFERENCE_BATCH[dims]

    estimate = feature_map_size(class_name, kwargs, patch, input_channels, output_channels)
    while estimate / reference_batch * _MIN_BATCH > budget:
        shrinkable = [a for a in range(dims) if patch[a] - divisor[a] >= _MIN_BOTTLENECK_EDGE * divisor[a]]
        if not shrinkable:
            break  # the smallest patch this topology allows; the trial may still run out of memory
        axis = max(shrinkable, key=lambda a: patch[a] / median[a])
        patch[axis] -= divisor[axis]
        estimate = feature_map_size(class_name, kwargs, patch, input_channels, output_channels)

    batch = round(budget / estimate * reference_batch)
    cases = int(dataset_json.get("numTraining", 0)) or 1
    dataset_voxels = math.prod(median) * cases
    batch_cap = round(dataset_voxels * _MAX_DATASET_COVERED / math.prod(patch))
    batch = max(min(batch, batch_cap), _MIN_BATCH)
    return PatchAndBatch(patch_size=patch, batch_size=int(batch), feature_map_size=estimate, budget=budget)


def apply_config_to_plans(plans: dict, config: TrialConfig, configuration: Optional[str] = None,
                          dataset_json: Optional[dict] = None) -> dict:
    """A copy of ``plans`` whose ``configuration`` entry describes the network of ``config``.

    With ``dataset_json`` (channels, labels and case count), the patch and batch size are
    re-derived for that network by :func:`fit_patch_and_batch`; without it they stay as planned.
    """
    configuration = configuration or config.configuration
    class_name, kwargs = architecture_kwargs(plans, config, configuration)
    new_plans = copy.deepcopy(plans)
    entry = new_plans["configurations"][configuration]
    planned = entry["architecture"]
    is_planned_network = planned.get("network_class_name") == class_name and planned.get("arch_kwargs") == kwargs
    if dataset_json is not None and not is_planned_network:
        fitted = fit_patch_and_batch(plans, dataset_json, class_name, kwargs, configuration)
        entry["patch_size"] = fitted.patch_size
        entry["batch_size"] = fitted.batch_size
    entry["architecture"] = {
        "network_class_name": class_name,
        "arch_kwargs": kwargs,
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    return new_plans


def build_network(
    plans: dict,
    dataset_json: dict,
    config: TrialConfig,
    configuration: Optional[str] = None,
    deep_supervision: bool = True,
):
    """Instantiate the network of ``config`` exactly as stock nnU-Net would from the new plans."""
    configuration = configuration or config.configuration
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(apply_config_to_plans(plans, config, configuration, dataset_json))
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
