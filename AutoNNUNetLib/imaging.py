"""Images and where they sit in the world: the one place for geometry conversions.

- :class:`Geometry` holds spacing, origin and direction in SimpleITK's LPS conventions (what image
  files use); :class:`Volume` is an array in SimpleITK (z, y, x) order with its geometry.
- Slicer volumes carry spacing, an origin and IJK-to-RAS directions in RAS. Converting between RAS
  and LPS only flips the sign of the first two physical axes, which is exact in floating point, so
  a volume exported from the scene and a prediction loaded back land on exactly the same grid.
  Slicer's ``arrayFromVolume`` returns arrays in KJI order, which is SimpleITK's (z, y, x) order:
  arrays pass through unchanged.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

PathLike = Union[str, os.PathLike]

#: Relative tolerance for "same grid" checks (spacing relative, origin in voxels, direction absolute).
GEOMETRY_TOLERANCE = 1e-4

#: Multiplying a RAS point by this (and back) gives LPS: the first two axes change sign.
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid sits in the world, in SimpleITK (LPS) conventions.

    ``spacing`` and ``origin`` are in x, y, z order (millimetres); ``direction`` is the row-major
    direction-cosine matrix flattened to ``dimension**2`` numbers, exactly as ``sitk.Image``
    reports it.
    """

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise lists/numpy arrays to float tuples so records hash and compare.
        object.__setattr__(self, "spacing", tuple(float(v) for v in np.ravel(self.spacing)))
        object.__setattr__(self, "origin", tuple(float(v) for v in np.ravel(self.origin)))
        object.__setattr__(self, "direction", tuple(float(v) for v in np.ravel(self.direction)))
        d = len(self.spacing)
        if len(self.origin) != d or len(self.direction) != d * d:
            raise ValueError(
                f"inconsistent geometry: {d} spacings, {len(self.origin)} origin values and "
                f"{len(self.direction)} direction values (expected {d}, {d} and {d * d})"
            )

    @property
    def dimension(self) -> int:
        return len(self.spacing)

    @classmethod
    def identity(cls, dimension: int = 3, spacing: Optional[Sequence[float]] = None) -> "Geometry":
        """Unit (or given) spacing, zero origin, identity direction."""
        spacing = tuple(spacing) if spacing is not None else (1.0,) * dimension
        return cls(spacing, (0.0,) * dimension, tuple(np.eye(dimension).ravel()))

    @classmethod
    def from_image(cls, image: Any) -> "Geometry":
        """From a ``sitk.Image`` or a ``sitk.ImageFileReader`` after ``ReadImageInformation()``."""
        return cls(image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry on ``image`` (in place) and return it."""
        if image.GetDimension() != self.dimension:
            raise ValueError(f"a {self.dimension}D geometry cannot be applied to a {image.GetDimension()}D image")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def differences(self, other: "Geometry", tol: float = GEOMETRY_TOLERANCE) -> list[str]:
        """Human-readable list of what differs from ``other`` beyond ``tol`` (empty when close)."""
        if self.dimension != other.dimension:
            return [f"dimension {self.dimension} vs {other.dimension}"]
        found = []
        a_sp, b_sp = np.array(self.spacing), np.array(other.spacing)
        if not np.all(np.abs(a_sp - b_sp) <= tol * np.maximum(np.abs(b_sp), 1e-12)):
            found.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)}")
        # Origins are compared in voxels: a shift of 1e-4 voxel is float noise, 0.5 voxel is not.
        voxel = float(min(np.min(np.abs(a_sp)), np.min(np.abs(b_sp)))) or 1.0
        if not np.all(np.abs(np.array(self.origin) - np.array(other.origin)) <= tol * voxel):
            found.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)}")
        if not np.allclose(self.direction, other.direction, rtol=0.0, atol=tol):
            found.append(f"direction {_fmt(self.direction)} vs {_fmt(other.direction)}")
        return found

    def close_to(self, other: "Geometry", tol: float = GEOMETRY_TOLERANCE) -> bool:
        """True when spacing, origin and direction all agree within ``tol`` (see :data:`GEOMETRY_TOLERANCE`)."""
        return not self.differences(other, tol)

    def to_dict(self) -> dict[str, list[float]]:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[float]]) -> "Geometry":
        return cls(data["spacing"], data["origin"], data["direction"])


@dataclass
class Volume:
    """A scalar image held in memory: a numpy array in SimpleITK order (z, y, x) and its geometry.

    This is the form the Slicer module hands over (``slicer.util.arrayFromVolume`` gives the same
    KJI order; the module converts its RAS IJK-to-RAS matrix to LPS geometry).
    """

    array: np.ndarray
    geometry: Optional[Geometry] = None

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.geometry is None:
            self.geometry = Geometry.identity(self.array.ndim)

    @property
    def size(self) -> tuple[int, ...]:
        """Grid size in SimpleITK (x, y, z) order."""
        return tuple(int(n) for n in self.array.shape[::-1])

    @classmethod
    def read(cls, path: PathLike) -> "Volume":
        """Read any file SimpleITK reads; voxel type kept as stored."""
        image = sitk.ReadImage(str(path))
        return cls(sitk.GetArrayFromImage(image), Geometry.from_image(image))

    def to_image(self) -> sitk.Image:
        """A ``sitk.Image`` with this array and geometry (bool becomes uint8, float16 float32)."""
        array = self.array
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)  # SimpleITK has no boolean pixel type
        elif array.dtype == np.float16:
            array = array.astype(np.float32)  # nor a half-float one
        image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
        assert self.geometry is not None
        return self.geometry.apply_to(image)

    def write(self, path: PathLike, compress: bool = True) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(self.to_image(), str(path), compress)
        return path


# RAS (Slicer scene) <-> LPS (files, Geometry)


def _as_direction_matrix(direction: Union[Sequence[float], Sequence[Sequence[float]], np.ndarray]) -> np.ndarray:
    """A 3x3 direction matrix (columns = the I, J, K axes) from a nested or row-major flat form."""
    matrix = np.asarray(direction, dtype=float)
    if matrix.shape == (9,):
        matrix = matrix.reshape(3, 3)
    if matrix.shape != (3, 3):
        raise ValueError(f"a direction must be 3x3 (or 9 values row-major), got shape {matrix.shape}")
    return matrix


def lps_from_ras(
    spacing: Sequence[float],
    origin_ras: Sequence[float],
    directions_ras: Union[Sequence[Sequence[float]], np.ndarray],
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Spacing, origin and direction in SimpleITK (LPS) form from a Slicer volume's RAS fields.

    ``directions_ras`` is the volume's IJK-to-RAS direction matrix, columns = unit I, J, K axes
    (what ``GetIJKToRASDirectionMatrix`` fills). Returns ``(spacing, origin, direction)`` with the
    direction flattened row-major, as ``sitk.Image.GetDirection()`` returns it. Only signs change,
    so the conversion is exact.
    """
    spacing_out = tuple(float(s) for s in spacing)
    if len(spacing_out) != 3 or any(not (s > 0 and math.isfinite(s)) for s in spacing_out):
        raise ValueError(f"spacing must be 3 positive finite values, got {tuple(spacing)}")
    origin = np.asarray(origin_ras, dtype=float)
    if origin.shape != (3,):
        raise ValueError(f"origin must have 3 values, got {tuple(origin_ras)}")
    direction = LPS_FROM_RAS @ _as_direction_matrix(directions_ras)
    return spacing_out, tuple(float(v) for v in LPS_FROM_RAS @ origin), tuple(float(v) for v in direction.ravel())


def ras_from_lps(
    spacing: Sequence[float], origin_lps: Sequence[float], direction_lps: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """Inverse of :func:`lps_from_ras`: ``(spacing, origin_ras, directions_ras 3x3)``."""
    origin = np.asarray(origin_lps, dtype=float)
    if origin.shape != (3,) or len(spacing) != 3:
        raise ValueError("only 3D geometries can be shown in Slicer")
    directions = LPS_FROM_RAS @ _as_direction_matrix(direction_lps)
    return tuple(float(s) for s in spacing), tuple(float(v) for v in LPS_FROM_RAS @ origin), directions


def geometry_from_ras(
    spacing: Sequence[float],
    origin_ras: Sequence[float],
    directions_ras: Union[Sequence[Sequence[float]], np.ndarray],
) -> Geometry:
    """A :class:`Geometry` (LPS) from a Slicer volume's spacing, origin and directions."""
    spacing_lps, origin_lps, direction_lps = lps_from_ras(spacing, origin_ras, directions_ras)
    return Geometry(spacing=spacing_lps, origin=origin_lps, direction=direction_lps)


def ras_from_geometry(geometry: Geometry) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """``(spacing, origin_ras, directions_ras)`` to set on a Slicer volume node from a Geometry."""
    return ras_from_lps(geometry.spacing, geometry.origin, geometry.direction)


def ijk_to_ras_matrix(
    spacing: Sequence[float], origin_ras: Sequence[float], directions_ras: Union[Sequence[Sequence[float]], np.ndarray]
) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix Slicer composes from spacing, origin and directions."""
    matrix = np.eye(4)
    matrix[:3, :3] = _as_direction_matrix(directions_ras) * np.asarray(spacing, dtype=float)[np.newaxis, :]
    matrix[:3, 3] = np.asarray(origin_ras, dtype=float)
    return matrix


def geometry_from_ijk_to_ras(matrix: Union[Sequence[Sequence[float]], np.ndarray], shape_kji: Optional[Sequence[int]] = None) -> Geometry:
    """A :class:`Geometry` from a 4x4 IJK-to-RAS matrix (e.g. ``arrayFromVTKMatrix``).

    Spacing is each axis column's length. The module prefers :func:`geometry_from_ras` with the
    volume node's own spacing/origin/directions, which is exact; this form is for matrices only
    (spacing recovered by a norm may differ from the stored one in the last bit). ``shape_kji`` (the
    array's shape, KJI = z, y, x) is checked to be 3D when given.
    """
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (4, 4):
        raise ValueError(f"IJK-to-RAS must be a 4x4 matrix, got shape {matrix.shape}")
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError("IJK-to-RAS must be an affine matrix (last row 0 0 0 1)")
    if shape_kji is not None and len(shape_kji) != 3:
        raise ValueError(f"a Slicer volume array is 3D (K, J, I), got shape {tuple(shape_kji)}")
    columns = matrix[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing == 0):
        raise ValueError("IJK-to-RAS matrix has a zero-length axis")
    return geometry_from_ras(spacing, matrix[:3, 3], columns / spacing[np.newaxis, :])


def ijk_to_ras_from_geometry(geometry: Geometry) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a :class:`Geometry` (inverse of :func:`geometry_from_ijk_to_ras`)."""
    return ijk_to_ras_matrix(*ras_from_geometry(geometry))
