"""The scene's training cases written as an nnU-Net dataset, one case in memory at a time.

Copying every channel and label of every case before writing anything needs the whole dataset in
memory (about 7.5 GB for 50 CT cases). Here each case is read from the scene only when its turn
comes, written to a staging file, and dropped; the library's ``build_dataset`` then checks and
writes the dataset from those files (it too reads one case at a time). The peak is about one
case, whatever the number of cases (Testing/slicer/test_slicer_export.py measures it).

No Slicer import: the scene side is a :class:`CaseReader` per case (logic.case_reader).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

#: Staging format: uncompressed NRRD keeps the geometry in full precision and writes fast.
STAGING_SUFFIX = ".nrrd"


@dataclass
class CaseReader:
    """One case as the export sees it: names now, voxels on demand.

    ``read()`` returns ``(channels, label_array, label_geometry)``: one ``imaging.Volume`` per
    channel and the label map as exported (value = segment position + 1, in ``segment_names``
    order) on the first channel's grid.
    """

    case_id: str
    segment_names: list[str]
    read: Callable[[], tuple[list[Any], Any, Any]]
    #: Each segment's color and terminology (terminology.SegmentLook), in ``segment_names`` order;
    #: None: names only. Recorded per class in dataset.json for the predicted segments.
    looks: Optional[list[Any]] = None

    def segment_looks(self) -> list[Any]:
        from .terminology import SegmentLook

        return list(self.looks) if self.looks is not None else [SegmentLook(n) for n in self.segment_names]


def other_datasets(work_dir: Path, dataset_id: int, name: str) -> list[str]:
    """Datasets in the working folder besides the one being written (fingerprint and search pick
    the dataset by themselves only when it is alone)."""
    from AutoNNUNetLib.workspace import dataset_folder_name

    target = dataset_folder_name(int(dataset_id), name)
    return sorted(p.name for p in (Path(work_dir) / "nnUNet_raw").glob("Dataset*") if p.is_dir() and p.name != target)


def export_dataset(readers: Sequence[CaseReader], channel_names: Sequence[str], aliases: Optional[Mapping[str, str]],
                   work_dir, dataset_id: int = 1, name: str = "AutoNNUNet", progress=None) -> Path:
    """Write the cases to ``work_dir``'s nnU-Net raw folder (replacing the same id and name)."""
    from AutoNNUNetLib.dataset import Case, DatasetSource, build_dataset
    from AutoNNUNetLib.dataset.classes import case_label_names, class_table_from_segment_names
    from AutoNNUNetLib.events import ProgressEvent
    from AutoNNUNetLib.imaging import Volume
    from AutoNNUNetLib.workspace import Workspace

    from .terminology import class_looks, record_looks

    work_dir = Path(work_dir)
    others = other_datasets(work_dir, dataset_id, name)
    if others:
        raise ValueError(f"the working folder already holds {', '.join(others)}; choose a new working folder, "
                         "or the same dataset ID and name to replace it")
    # One class table for all cases, from names alone: refuses empty names before any voxel is read.
    classes = class_table_from_segment_names([r.segment_names for r in readers], aliases)
    work_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".autonnunet-export-", dir=work_dir))

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(ProgressEvent("progress", {"fraction": round(fraction, 4), "message": message}))

    try:
        cases = []
        for index, reader in enumerate(readers):
            channels, label, geometry = reader.read()
            paths = [channel.write(staging / f"{reader.case_id}_{c:04d}{STAGING_SUFFIX}", compress=False)
                     for c, channel in enumerate(channels)]
            label_path = Volume(array=label, geometry=geometry).write(
                staging / f"{reader.case_id}_label{STAGING_SUFFIX}", compress=False)
            del channels, label  # the case's voxels go now, before the next case is read
            cases.append(Case(reader.case_id, paths, label_path, case_label_names(reader.segment_names, aliases)))
            report(0.3 * (index + 1) / len(readers), f"read {reader.case_id} from the scene")

        def forward(event) -> None:  # build_dataset's own 0..1 becomes 0.3..1
            fraction = event.data.get("fraction")
            if fraction is not None:
                report(0.3 + 0.7 * float(fraction), str(event.data.get("message") or ""))

        source = DatasetSource(cases=cases, classes=classes, channel_names=list(channel_names))
        folder = Path(build_dataset(source, Workspace(work_dir), dataset_id=int(dataset_id), name=name,
                                    overwrite=True, progress=forward))
        record_looks(folder, class_looks([r.segment_looks() for r in readers], aliases))
        return folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
