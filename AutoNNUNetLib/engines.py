"""Engines for the tile forward pass: torch (nnU-Net's own), ONNX Runtime and OpenVINO on CPU.

An engine runs the trained network on one ``(1, channels, *patch)`` tile and returns the logits as a
float32 torch tensor; the sliding window (:mod:`AutoNNUNetLib.bounded.sliding`) does everything else.
``load_fold(i)`` switches to the weights of ``predictor.list_of_parameters[i]``.

- ``torch``: the network nnU-Net built, in eval mode. Its logits are nnU-Net's bit for bit. Options:
  ``channels_last`` (``torch.channels_last_3d`` memory format) and ``bfloat16`` (CPU autocast, only
  where the CPU has native bfloat16; not bit-equal to float32).
- ``onnxruntime`` / ``openvino``: the same weights exported once per model folder and fold to ONNX
  (``fold_N/<checkpoint stem>.tile<patch>.onnx`` beside the checkpoint, reused while it is newer than
  the checkpoint), run on the CPU. Their float32 arithmetic differs from torch's in the last bits,
  so a label can flip where two classes' logits are (nearly) tied; the benchmark measures how often.

GPU prediction always uses torch. ``make_engine("auto", ...)`` picks :data:`CPU_DEFAULT` on CPU.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from .errors import AutoNNUNetError

logger = logging.getLogger(__name__)

ENGINES = ("torch", "onnxruntime", "openvino")
#: The CPU default; torch until a measurement shows another engine faster with equal label maps.
CPU_DEFAULT = "torch"


class EngineError(AutoNNUNetError, ValueError):
    """An engine is unknown, not installed, or cannot run this model."""


class TorchEngine:
    """nnU-Net's torch network (the reference)."""

    name = "torch"

    def __init__(self, predictor, channels_last: bool = False, bfloat16: bool = False):
        import torch

        self.predictor = predictor
        self.network = predictor.network.to(predictor.device).eval()
        self.channels_last = bool(channels_last)
        self.bfloat16 = bool(bfloat16)
        if self.bfloat16 and not cpu_has_bfloat16():
            raise EngineError("bfloat16 needs a CPU with native bfloat16 (AVX512-BF16 or AMX)")
        if self.channels_last:
            self.network = self.network.to(memory_format=torch.channels_last_3d)
        self._fold: Optional[int] = None if len(predictor.list_of_parameters) > 1 else 0

    def load_fold(self, fold: int) -> None:
        if self._fold == fold:
            return  # one fold: its weights are already in the network
        network = getattr(self.network, "_orig_mod", self.network)
        network.load_state_dict(self.predictor.list_of_parameters[fold])
        self._fold = fold

    def __call__(self, tile):
        import torch

        if self.channels_last:
            tile = tile.contiguous(memory_format=torch.channels_last_3d)
        if self.bfloat16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.network(tile).float().contiguous()
        return self.network(tile).contiguous() if self.channels_last else self.network(tile)


class _ExportedEngine:
    """Shared part of the ONNX-based engines: export per fold, cache beside the checkpoint."""

    name = "exported"

    def __init__(self, predictor, model_dir, folds, checkpoint: str):
        self.predictor = predictor
        self.model_dir = Path(model_dir)
        self.folds = list(folds)
        self.checkpoint = checkpoint
        self.patch = tuple(int(v) for v in predictor.configuration_manager.patch_size)
        self.channels = _input_channels(predictor)
        self._sessions: dict[int, object] = {}
        self._fold = 0

    def onnx_path(self, fold: int) -> Path:
        name = f"{Path(self.checkpoint).stem}.tile{'x'.join(map(str, self.patch))}.onnx"
        return self.model_dir / f"fold_{self.folds[fold]}" / name

    def export(self, fold: int) -> Path:
        """Write (or reuse) the ONNX file of one fold's weights; returns its path."""
        import torch

        path = self.onnx_path(fold)
        checkpoint = path.parent / self.checkpoint
        if path.is_file() and (not checkpoint.exists() or path.stat().st_mtime >= checkpoint.stat().st_mtime):
            return path
        network = getattr(self.predictor.network, "_orig_mod", self.predictor.network)
        network = network.to("cpu").eval()
        network.load_state_dict(self.predictor.list_of_parameters[fold])
        example = torch.zeros((1, self.channels, *self.patch), dtype=torch.float32)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with torch.inference_mode():
            torch.onnx.export(network, (example,), str(temporary), input_names=["tile"], output_names=["logits"],
                              opset_version=17, dynamo=False)
        os.replace(temporary, path)  # atomic: a concurrent reader never sees half a file
        logger.info("exported fold %s to %s", self.folds[fold], path)
        return path

    def load_fold(self, fold: int) -> None:
        if fold not in self._sessions:
            self._sessions[fold] = self._open(self.export(fold))
        self._fold = fold

    def _open(self, path: Path):  # pragma: no cover - overridden
        raise NotImplementedError

    def _run(self, session, tile_numpy):  # pragma: no cover - overridden
        raise NotImplementedError

    def __call__(self, tile):
        import torch

        if self._fold not in self._sessions:
            self.load_fold(self._fold)
        array = tile.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self._run(self._sessions[self._fold], array))


class OnnxRuntimeEngine(_ExportedEngine):
    name = "onnxruntime"

    def _open(self, path: Path):
        try:
            import onnxruntime
        except ImportError as error:
            raise EngineError("the onnxruntime engine needs `pip install onnxruntime`") from error
        import torch

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _run(self, session, tile_numpy):
        return session.run(["logits"], {"tile": tile_numpy})[0]


class OpenVinoEngine(_ExportedEngine):
    name = "openvino"

    def _open(self, path: Path):
        try:
            import openvino
        except ImportError as error:
            raise EngineError("the openvino engine needs `pip install openvino`") from error
        import torch

        core = openvino.Core()
        # f32 inference precision: OpenVINO would otherwise pick bf16 on CPUs that have it.
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        return core.compile_model(str(path), "CPU", config)

    def _run(self, compiled, tile_numpy):
        return compiled(tile_numpy)[0].copy()


def _input_channels(predictor) -> int:
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    return int(determine_num_input_channels(predictor.plans_manager, predictor.configuration_manager,
                                            predictor.dataset_json))


def cpu_has_bfloat16() -> bool:
    """True where the CPU computes bfloat16 natively (x86 AVX512-BF16 / AMX); read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def make_engine(name: str, predictor, model_dir=None, folds=None, checkpoint: str = "checkpoint_final.pth", **options):
    """The engine called ``name`` (``auto``, ``torch``, ``onnxruntime``, ``openvino``) for a loaded predictor.

    ``model_dir``, ``folds`` and ``checkpoint`` tell exported engines where to cache their files;
    without them (or on a GPU) ``auto`` means torch.
    """
    if name not in ("auto", *ENGINES):
        raise EngineError(f"unknown engine {name!r}; choose auto, {', '.join(ENGINES)}")
    on_cpu = predictor.device.type == "cpu"
    if name == "auto":
        name = CPU_DEFAULT if on_cpu and model_dir is not None else "torch"
    if name == "torch":
        return TorchEngine(predictor, **options)
    if not on_cpu:
        raise EngineError(f"the {name} engine runs on CPU only; the GPU uses torch")
    if model_dir is None or folds is None:
        raise EngineError(f"the {name} engine needs the model folder and folds (to cache its export)")
    engine_class = OnnxRuntimeEngine if name == "onnxruntime" else OpenVinoEngine
    return engine_class(predictor, model_dir, folds, checkpoint)
