"""Compute devices: the one place that decides which device a process and its workers use.

``auto`` picks CUDA, then MPS, then the CPU. Several search workers each get one GPU, taken from
the GPUs *this process was given*: when a job runner sets ``CUDA_VISIBLE_DEVICES=2,3``, the workers
get ``2`` and ``3`` (physical ids), never ``0`` and ``1``, which belong to other jobs.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Sequence

from .errors import DeviceError

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
VISIBLE = "CUDA_VISIBLE_DEVICES"


def check_device_name(device: Optional[str]) -> str:
    """The device text if it is one we understand (no torch import: usable by records and the server)."""
    text = "auto" if device is None else str(device).strip().lower()
    if not DEVICE_RE.match(text):
        raise DeviceError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    return text


def resolve_device(device: Any = "auto"):
    """A ``torch.device`` for ``device``; a requested device that is not available is a DeviceError."""
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    text = check_device_name(device)
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    dev = torch.device(text)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {text!r} requested but CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {text!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not mps_ok:
        raise DeviceError(f"device {text!r} requested but MPS is not available on this machine (use --device cpu)")
    return dev


def visible_gpus(environ: Optional[Mapping[str, str]] = None, device_count: Optional[int] = None) -> list[str]:
    """The physical GPU ids this process may use, as ``CUDA_VISIBLE_DEVICES`` entries.

    When the variable is set, its entries (ids or UUIDs) are the answer; an empty value means no GPU.
    Otherwise every device torch counts (``device_count``, asked of torch when not given).
    """
    environ = os.environ if environ is None else environ
    if VISIBLE in environ:
        return [entry.strip() for entry in environ[VISIBLE].split(",") if entry.strip() and entry.strip() != "-1"]
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(device_count)]


def worker_environment(index: int, gpus: Sequence[str]) -> dict[str, str]:
    """The environment overlay of search worker ``index``: one GPU of ``gpus``, round robin."""
    if not gpus:
        return {}
    return {VISIBLE: str(gpus[index % len(gpus)])}
