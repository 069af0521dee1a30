"""Labeled cases in, a validated nnU-Net v2 raw dataset out.

nnU-Net expects its training data in one layout only::

    nnUNet_raw/DatasetNNN_Name/
        imagesTr/<case>_<XXXX>.nii.gz     one file per channel XXXX = 0000, 0001, ...
        labelsTr/<case>.nii.gz            integer label map on the image's grid
        dataset.json                      channel_names, labels, numTraining, file_ending

and it reports problems late (during planning or training), often as a bare assertion. This
package turns the forms users actually hold into that layout and checks everything first. One
concept per module, in pipeline order:

- :mod:`.records`: :class:`Case`, :class:`DatasetSource`, :class:`Problem`, :class:`DatasetError`
- :mod:`.sources`: an MSD task folder, an nnU-Net raw folder, image/label pairs, a CSV of pairs
- :mod:`.containment`: every file of a folder source stays inside it (uploads checked twice)
- :mod:`.headers`: reading files header first; NIfTI completeness; NaN/Inf the way nnU-Net sees them
- :mod:`.classes`: the one class-name rule and the class table
- :mod:`.validate`: every check, before anything is written
- :mod:`.build`: :func:`build_dataset`, all or nothing
- :mod:`.cli`: the ``autonnunet dataset`` verb

Conventions: geometry follows SimpleITK (LPS world coordinates, ``spacing``/``origin`` in x, y, z
order, ``direction`` as a row-major matrix); arrays follow SimpleITK's numpy order (z, y, x).

Names are loaded lazily, so importing a light submodule does not pull in SimpleITK.
"""

from __future__ import annotations

from ..lazy import lazy_exports

#: Public name -> submodule holding it.
_EXPORTS = {
    # records
    "Problem": "records", "DatasetError": "records", "ChannelFile": "records", "Case": "records",
    "DatasetSource": "records", "ChannelSpec": "records", "LabelSpec": "records", "PathLike": "records",
    "FILE_ENDING": "records", "KNOWN_ENDINGS": "records", "CASE_ID_RE": "records",
    "MAX_LISTED_PROBLEMS": "records", "case_id_from_name": "records", "case_id_key": "records",
    # geometry (kept importable from here: the Slicer module and older callers use it)
    "Geometry": "..imaging", "Volume": "..imaging", "GEOMETRY_TOLERANCE": "..imaging",
    # headers
    "nonfinite_voxels": "headers", "nonfinite_by_channel": "headers",
    # containment (uploads)
    "check_inside": "containment",
    # sources
    "source_from_msd": "sources", "source_from_nnunet_raw": "sources", "source_from_pairs": "sources",
    "read_pairs_csv": "sources", "detect_source": "sources", "expand_channels": "sources",
    # classes
    "BACKGROUND": "classes", "MAX_CLASSES": "classes", "class_key": "classes", "resolve_class_name": "classes",
    "class_table_from_segment_names": "classes", "segment_label_lookup": "classes",
    "remap_case_labels": "classes", "case_label_names": "classes", "ClassRow": "classes",
    "class_rows": "classes", "parse_classes": "classes", "ORIGINAL_LABELS_KEY": "classes",
    "read_original_labels": "classes", "restore_original_labels": "classes",
    # validate and build
    "EMPTY_LABEL": "validate", "MIN_CASES": "validate", "check_source": "validate",
    "build_dataset": "build", "label_dtype": "build",
    # CLI
    "add_commands": "cli",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
