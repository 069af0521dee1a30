"""The ``autonnunet dataset`` verb: build a validated nnU-Net raw dataset from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dataset",
        help="build a validated nnU-Net raw dataset (MSD folder, nnU-Net folder or image/label pairs)",
        description=(
            "Validate labeled cases and write them as an nnU-Net v2 raw dataset in WORKDIR/nnUNet_raw. "
            "SOURCE is an MSD task folder or an nnU-Net raw dataset folder; or give --pairs-csv."
        ),
    )
    parser.add_argument("source", nargs="?", type=Path, help="MSD task folder or nnU-Net raw dataset folder")
    parser.add_argument(
        "--pairs-csv", type=Path, metavar="FILE",
        help="CSV with rows case_id,label,image[,image2,...] (paths relative to the CSV)",
    )
    parser.add_argument(
        "--classes", metavar="TABLE",
        help='class table on the label values in the files, e.g. "liver=1,tumor=2" or "pz=7,tz=8" (background=0 '
             "implied; values other than 0, 1, 2, ... are renumbered and the mapping recorded in dataset.json)",
    )
    parser.add_argument(
        "--channel-names", metavar="NAMES", help='channel names, e.g. "T1,T2" ("CT" selects CT normalisation)'
    )
    parser.add_argument("--workdir", required=True, type=Path, help="workspace folder")
    parser.add_argument("--id", dest="dataset_id", type=int, default=1, help="nnU-Net dataset number (default 1)")
    parser.add_argument("--name", help="dataset name (default: the source's own name, else AutoNNUNet)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same id and name")
    parser.set_defaults(func=_run_dataset_command)


def _run_dataset_command(args: argparse.Namespace) -> int:
    from ..workspace import Workspace
    from .build import build_dataset
    from .classes import parse_classes, read_original_labels
    from .records import DatasetError
    from .sources import detect_source, read_pairs_csv, source_from_pairs

    if (args.source is None) == (args.pairs_csv is None):
        raise DatasetError("give either SOURCE (MSD or nnU-Net folder) or --pairs-csv FILE")
    classes = parse_classes(args.classes) if args.classes else None
    if args.pairs_csv is not None:
        source = source_from_pairs(read_pairs_csv(args.pairs_csv), classes=classes)
    else:
        source = detect_source(args.source)
        if classes is not None:
            source.classes = classes
    if args.channel_names is not None:
        source.channel_names = [n.strip() for n in args.channel_names.split(",") if n.strip()]
        if not source.channel_names:
            raise DatasetError(f"--channel-names {args.channel_names!r} names no channel; give e.g. \"T1,T2\"")
    name = args.name or source.name or "AutoNNUNet"
    workspace = Workspace(args.workdir)
    folder = build_dataset(source, workspace, dataset_id=args.dataset_id, name=name, overwrite=args.overwrite)
    meta = json.loads((folder / "dataset.json").read_text())
    channels = ", ".join(meta["channel_names"].values())
    labels = ", ".join(f"{n}={v}" for n, v in meta["labels"].items())
    print(f"{folder.name}: {meta['numTraining']} cases")
    print(f"  channels: {len(meta['channel_names'])} ({channels})")
    print(f"  classes:  {labels}")
    original = read_original_labels(meta)
    if original:
        values = ", ".join(f"{written}<-{value}" for written, value in original.items() if written)
        print(f"  renumbered from the files' values: {values} (recorded in dataset.json)")
    print(f"  written:  {folder}")
    return 0
