"""Real files for the intake tests: small NIfTI/NRRD cases written by SimpleITK, in the source layouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

SHAPE = (4, 5, 6)  # z, y, x
SPACING = (0.7, 0.8, 1.9)


def write(array: np.ndarray, path: Path, spacing: Sequence[float] = SPACING) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(spacing)[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


def label(k: int, values: Sequence[int] = (1,), dtype=np.uint8) -> np.ndarray:
    """A label map holding every value of ``values`` (and background)."""
    array = np.zeros(SHAPE, dtype)
    for n, value in enumerate(values):
        array[n % SHAPE[0], 1 + k % 2 :, n // SHAPE[0] :] = value
    return array


def image(k: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(k).normal(50, 10, SHAPE).astype(dtype)


def pairs_folder(root: Path, n: int = 5, ending: str = ".nii.gz", values: Sequence[int] = (1,),
                 label_dtype=np.uint8) -> list[tuple[str, list[Path], Path]]:
    """``n`` cases as (case_id, [image], label) rows of files in ``root``."""
    rows = []
    for k in range(n):
        img = write(image(k), root / f"i{k}{ending}")
        lab = write(label(k, values, label_dtype), root / f"l{k}{ending}")
        rows.append((f"c{k}", [img], lab))
    return rows


def msd_folder(root: Path, n: int = 5, labels: Optional[dict] = None, name: str = "Task01_Test") -> Path:
    folder = root / name
    entries = []
    for k in range(n):
        write(image(k), folder / "imagesTr" / f"c{k}.nii.gz")
        write(label(k), folder / "labelsTr" / f"c{k}.nii.gz")
        entries.append({"image": f"./imagesTr/c{k}.nii.gz", "label": f"./labelsTr/c{k}.nii.gz"})
    meta = {"name": "Test", "modality": {"0": "MRI"}, "labels": labels or {"0": "background", "1": "thing"},
            "numTraining": n, "training": entries}
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def nothing_written(workdir: Path) -> bool:
    """No dataset and no hidden temporary or backup folder in the workspace's nnUNet_raw."""
    raw = workdir / "nnUNet_raw"
    return not raw.exists() or list(raw.iterdir()) == []
