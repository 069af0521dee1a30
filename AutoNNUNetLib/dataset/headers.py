"""Reading case files, header first: geometry, pixel type and channels before any voxel.

Validation reads every header before it reads voxels, so a wrong grid in a big file is found in
milliseconds. Two checks here exist because SimpleITK hides the problem when reading voxels:

- a truncated ``.nii.gz`` is zero-filled by ITK without an error (:func:`check_nifti_complete`);
- NaN/Inf in a NIfTI file are turned into 0 by ITK's NIfTI reader, while nnU-Net's NibabelIO
  keeps them and fails later; :func:`nonfinite_voxels` reads NIfTI with nibabel, which keeps them.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from ..imaging import Geometry, Volume
from ..imaging import _fmt as fmt  # the one way geometry values are shown
from .records import ChannelFile, ChannelSpec, DatasetError, LabelSpec, PathLike

REAL_SCALAR_PIXEL_IDS = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32,
    sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64, sitk.sitkFloat32, sitk.sitkFloat64,
}
FLOAT_PIXEL_IDS = {sitk.sitkFloat32, sitk.sitkFloat64}


@dataclass(frozen=True)
class Header:
    """What a file's header (or a Volume) says, before any voxel is read."""

    size: tuple[int, ...]          # x, y, z (of one channel)
    geometry: Geometry             # of one channel
    pixel_id: int                  # SimpleITK component pixel id
    n_channels: int                # > 1 for 4D or vector files
    plain: bool                    # a single-channel 2D/3D scalar file (can be copied as is)

    @property
    def is_float(self) -> bool:
        return self.pixel_id in FLOAT_PIXEL_IDS


def size_text(size) -> str:
    return "x".join(str(n) for n in size)


def describe(spec: Union[ChannelSpec, LabelSpec]) -> str:
    """A short name for messages: the file name (never its folder) or "in-memory array"."""
    if isinstance(spec, Volume):
        return "in-memory array"
    if isinstance(spec, ChannelFile):
        return f"{spec.path.name} channel {spec.index}"
    return Path(spec).name


def sitk_reason(error: Exception) -> str:
    """SimpleITK messages start with a C++ file location; keep the part a user can act on."""
    text = str(error).strip()
    match = re.search(r"(sitk::ERROR|ERROR|Description):\s*(.*)", text, re.S)
    reason = (match.group(2) if match else text).strip().splitlines()
    return reason[0] if reason else "unreadable file"


def read_header(path: Path) -> Header:
    """Header-only read (``ReadImageInformation``): cheap geometry checks on big files."""
    try:
        kind = "folder" if path.is_dir() else "file" if path.is_file() else None
    except OSError as error:  # e.g. a name too long for the file system
        raise DatasetError(f"cannot read {path.name[:80]}: {error.strerror or error}") from None
    if kind == "folder":
        raise DatasetError(f"{path} is a folder, not an image file")
    if kind is None:
        raise DatasetError(f"file not found: {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise DatasetError(f"cannot read {path}: {sitk_reason(error)}") from None
    size, dim, components = reader.GetSize(), reader.GetDimension(), reader.GetNumberOfComponents()
    pixel_id = reader.GetPixelID()
    if components > 1:
        # A vector image: channels are components on one grid.
        return Header(tuple(size), Geometry.from_image(reader), _component_id(pixel_id), components, False)
    if dim == 4:
        # 4D (MSD multi-channel): the 4th axis is the channel; the 3D geometry is the upper-left block.
        direction = np.reshape(reader.GetDirection(), (4, 4))[:3, :3]
        geometry = Geometry(reader.GetSpacing()[:3], reader.GetOrigin()[:3], direction)
        return Header(tuple(size[:3]), geometry, pixel_id, int(size[3]), False)
    return Header(tuple(size), Geometry.from_image(reader), pixel_id, 1, dim in (2, 3))


def _component_id(vector_pixel_id: int) -> int:
    """The scalar pixel id of a vector pixel id (e.g. VectorFloat32 -> Float32)."""
    probe = sitk.Image([1] * 2, vector_pixel_id, 2)
    return sitk.VectorIndexSelectionCast(probe, 0).GetPixelID()


def volume_header(volume: Volume) -> Header:
    array = volume.array
    if array.ndim not in (2, 3):
        raise DatasetError(f"in-memory array has {array.ndim} dimensions; expected a 2D or 3D scalar array per channel")
    assert volume.geometry is not None
    if volume.geometry.dimension != array.ndim:
        raise DatasetError(f"{array.ndim}D array with a {volume.geometry.dimension}D geometry")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
        raise DatasetError(f"unsupported array type {array.dtype}")
    check_geometry_values(volume.geometry)
    pixel_id = sitk.sitkFloat32 if array.dtype.kind == "f" else sitk.sitkInt32  # only float-ness matters here
    return Header(volume.size, volume.geometry, pixel_id, 1, False)


def check_geometry_values(geometry: Geometry) -> None:
    """What NIfTI cannot store or nnU-Net cannot use: non-positive spacing, non-orthonormal axes."""
    values = geometry.spacing + geometry.origin + geometry.direction
    if not all(math.isfinite(v) for v in values):
        raise DatasetError("geometry holds NaN/Inf values")
    if min(geometry.spacing) <= 0:
        raise DatasetError(f"spacing must be positive, got {fmt(geometry.spacing)}")
    d = geometry.dimension
    matrix = np.reshape(geometry.direction, (d, d))
    if not np.allclose(matrix @ matrix.T, np.eye(d), atol=1e-3):
        raise DatasetError(f"direction {fmt(geometry.direction)} is not orthonormal")


def is_nifti(path: PathLike) -> bool:
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def check_nifti_complete(path: Path) -> None:
    """Raise when a NIfTI file holds less voxel data than its header promises.

    ITK zero-fills a truncated ``.nii.gz`` without any error (an interrupted copy or download then
    trains on black voxels), so the stream is decompressed and its length checked here.
    """
    if not is_nifti(path):
        return
    compressed = path.name.lower().endswith(".gz")
    if compressed:
        with open(path, "rb") as handle:
            if handle.read(2) != b"\x1f\x8b":
                # SimpleITK reads such a file, nibabel (and so nnU-Net's NibabelIO) does not.
                raise DatasetError(f"{path.name} is named .nii.gz but is not gzip-compressed; rename it to .nii")
    opener = gzip.open if compressed else open
    length, head = 0, b""
    try:
        with opener(path, "rb") as handle:
            while True:
                chunk = handle.read(1 << 22)
                if not chunk:
                    break
                if len(head) < 540:
                    head += chunk[: 540 - len(head)]
                length += len(chunk)
    except (EOFError, OSError, zlib.error) as error:
        raise DatasetError(f"{path.name} is truncated or corrupt ({error})") from None
    expected = _nifti_expected_length(head)
    if expected is not None and length < expected:
        raise DatasetError(f"{path.name} is truncated: {length} bytes of data, the header needs {expected}")


def _nifti_expected_length(head: bytes) -> Optional[int]:
    """vox_offset + voxels * bytes per voxel from a NIfTI-1 or NIfTI-2 header (None if not parseable)."""
    for order in ("<", ">"):
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            dims = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7:
        return None
    return offset + int(np.prod([max(int(d), 1) for d in dims[1 : dims[0] + 1]])) * bitpix // 8


def nonfinite_voxels(path: PathLike, channel: Optional[int] = None) -> int:
    """How many voxels of an image file are NaN or +-Inf (0 for integer files).

    NIfTI files are read with nibabel, because ITK's NIfTI reader (and so SimpleITK) silently
    returns 0 for NaN/Inf; nnU-Net's NibabelIO and most tools keep them. Other formats are read
    with SimpleITK, which keeps them. ``channel`` counts one channel of a 4D (or vector) file
    only. Raises :class:`DatasetError` (naming the file, not its folder) for an unreadable file.
    """
    counts = nonfinite_by_channel(path)
    return sum(counts) if channel is None else counts[channel]


def nonfinite_by_channel(path: PathLike) -> list[int]:
    """:func:`nonfinite_voxels` of every channel of a file (one entry for a 2D/3D scalar file),
    reading the file once."""
    path = Path(path)
    if is_nifti(path):
        import nibabel

        try:
            image = nibabel.load(str(path))
            shape = image.shape
            if np.dtype(image.get_data_dtype()).kind not in "fc" and not _nifti_scaled(image):
                return [0] * _nifti_channels(shape)
            array = np.asanyarray(image.dataobj)
        except Exception as error:  # nibabel raises many types for broken files
            raise DatasetError(f"cannot read {path.name}: {error}") from None
        # nibabel order is x, y, z, t[, components]: channels are the 4th axis (or the 5th).
        channels = array.reshape(*shape[:3], -1) if array.ndim >= 4 else array[..., None]
        channel_axis = 3
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            raise DatasetError(f"cannot read {path.name}: {sitk_reason(error)}") from None
        vector = image.GetNumberOfComponentsPerPixel() > 1
        if image.GetPixelID() in REAL_SCALAR_PIXEL_IDS - FLOAT_PIXEL_IDS:
            return [0] * (image.GetNumberOfComponentsPerPixel() if vector else 1)
        array = sitk.GetArrayViewFromImage(image)
        if vector:
            channels, channel_axis = array, array.ndim - 1
        elif image.GetDimension() == 4:
            channels, channel_axis = array, 0  # numpy order c, z, y, x
        else:
            channels, channel_axis = array[None], 0
    if channels.dtype.kind not in "fc":
        return [0] * channels.shape[channel_axis]
    finite = np.isfinite(channels)
    other_axes = tuple(axis for axis in range(channels.ndim) if axis != channel_axis)
    return [int(n) for n in finite.size // channels.shape[channel_axis] - finite.sum(axis=other_axes)]


def _nifti_channels(shape) -> int:
    return int(np.prod(shape[3:])) if len(shape) >= 4 else 1


def _nifti_scaled(image) -> bool:
    """Whether nibabel scales the stored integers (``scl_slope``), which can make them float."""
    slope, _ = image.header.get_slope_inter()
    return slope is not None and slope != 1


def spec_header(spec: Union[ChannelSpec, LabelSpec]) -> Header:
    """The header of one channel or label, with its geometry checked (a file's as well as an array's)."""
    if isinstance(spec, Volume):
        return volume_header(spec)
    if isinstance(spec, ChannelFile):
        header = read_header(spec.path)
        if not 0 <= spec.index < header.n_channels:
            raise DatasetError(f"{spec.path.name} has {header.n_channels} channel(s), channel {spec.index} requested")
    else:
        header = read_header(Path(spec))
        if header.n_channels > 1:
            raise DatasetError(
                f"{Path(spec).name} holds {header.n_channels} channels; give one file per channel or list them as "
                "ChannelFile entries"
            )
    try:
        check_geometry_values(header.geometry)
    except DatasetError as error:
        name = spec.path.name if isinstance(spec, ChannelFile) else Path(spec).name
        raise DatasetError(f"{name}: {error}") from None
    return header


class FileCache:
    """Images of the current case, so a 4D file holding several channels is read once."""

    def __init__(self) -> None:
        self._images: dict[Path, sitk.Image] = {}

    def read(self, path: Path) -> sitk.Image:
        if path not in self._images:
            try:
                self._images[path] = sitk.ReadImage(str(path))
            except RuntimeError as error:
                raise DatasetError(f"cannot read {path.name}: {sitk_reason(error)}") from None
        return self._images[path]

    def clear(self) -> None:
        self._images.clear()


def load_image(spec: Union[ChannelSpec, LabelSpec], cache: FileCache) -> sitk.Image:
    """The 2D/3D scalar image of one channel or label."""
    if isinstance(spec, Volume):
        return spec.to_image()
    if isinstance(spec, ChannelFile):
        image = cache.read(spec.path)
        if image.GetNumberOfComponentsPerPixel() > 1:
            return sitk.VectorIndexSelectionCast(image, spec.index)
        size = list(image.GetSize())
        size[3] = 0  # collapse the channel axis
        return sitk.Extract(
            image, size, [0, 0, 0, spec.index], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX
        )
    image = cache.read(Path(spec))
    if image.GetDimension() == 4:  # a 4D file with a single channel
        size = list(image.GetSize())
        size[3] = 0
        return sitk.Extract(image, size, [0, 0, 0, 0], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    return image


def array_of(spec: Union[ChannelSpec, LabelSpec], cache: FileCache) -> np.ndarray:
    if isinstance(spec, Volume):
        return spec.array  # no copy for in-memory data
    # A copy, not GetArrayViewFromImage: load_image may return a temporary (an Extract of a 4D
    # file), and a view of it would outlive the image and read freed memory.
    return sitk.GetArrayFromImage(load_image(spec, cache))
