"""``autonnunet finalize`` and ``autonnunet select``.

::

    autonnunet finalize --workdir W --search ROOT --top 1 --epochs 1000 --output SEL   # train all folds
    autonnunet select SEL [--markdown]                                              # choose, write files, report

``finalize --select`` does both. Re-running ``finalize`` trains only the folds that are missing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cmd_finalize(args: argparse.Namespace) -> int:
    from ..events import EventWriter, ProgressEvent
    from ..folds import parse_folds
    from ..jobs.params import SelectParams
    from ..workspace import Workspace
    from .candidates import candidates_from_models, candidates_from_search
    from .finalize import finalize
    from .layout import SelectionError

    if bool(args.search) == bool(args.model):
        raise SelectionError("give either --search ROOT or --model DIR [DIR ...]")
    # The one select request record (what the job server and the Slicer module send): its checks,
    # its defaults.
    request = SelectParams.from_args(args)
    workspace = Workspace(args.workdir, args.dataset)
    if args.search:
        candidates = candidates_from_search(Path(args.search), top=request.top, workspace=workspace,
                                            configurations=request.configurations)
    else:
        candidates = candidates_from_models([Path(p) for p in args.model])
    output = Path(args.output) if args.output else Path(args.search or args.model[0]).parent / "selection"
    writer = EventWriter(args.events) if args.events else None

    def report(event: ProgressEvent) -> None:
        if writer is not None:
            writer(event)
        if event.kind == "progress":
            print(event.data["message"], flush=True)

    print("candidates: " + ", ".join(f"{c.name} ({c.configuration})" for c in candidates), flush=True)
    optional = {name: getattr(request, name) for name in ("iterations_per_epoch", "seed")
                if getattr(request, name) is not None}
    result = finalize(workspace, candidates, output, epochs=request.epochs, folds=parse_folds(request.folds),
                      device=request.device, use_mirroring=request.tta, progress=report, **optional)
    trained = result.trained()
    print(f"finalized {len(result.candidates)} candidate(s) in {output}; trained {len(trained)} fold(s) this run")
    if args.select:
        return _run_select(output, allow_ensembles=request.ensembles, markdown=False, as_json=False)
    return 0


def _run_select(root: Path, allow_ensembles: bool, markdown: bool, as_json: bool) -> int:
    from .choose import select
    from .report import format_report

    result = select(root, allow_ensembles=allow_ensembles)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_report(result, markdown=markdown), end="")
        print(f"nnU-Net files: {root / 'nnUNet_results' / result.dataset}")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    if args.report_only:
        from .choose import SelectionResult
        from .report import format_report

        print(format_report(SelectionResult.load(args.root), markdown=args.markdown), end="")
        return 0
    return _run_select(args.root, not args.no_ensembles, args.markdown, args.json)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("finalize", help="train the search's candidates on all folds (resumable)",
                              description="Train the incumbent, the next best Pareto points and the incumbent in "
                                          "other planned configurations on all folds to --epochs, keeping the "
                                          "cross-validation probabilities. Re-running trains only missing folds.")
    p.add_argument("--workdir", required=True, help="the search's workspace")
    p.add_argument("--dataset", help="dataset name when the workspace holds several")
    p.add_argument("--search", help="search root (results.json): incumbent and Pareto points")
    p.add_argument("--model", nargs="+", help="model folders to finalize instead of a search's candidates")
    p.add_argument("--top", type=int, default=1, help="next best Pareto points besides the incumbent (default 1)")
    p.add_argument("--configurations", nargs="+", default=["2d", "3d_lowres"],
                   help="other configurations of the incumbent where planned and preprocessed, or 'none'")
    p.add_argument("--output", help="selection root (default: beside the search root, 'selection')")
    p.add_argument("--epochs", type=int, required=True, help="final training length F")
    p.add_argument("--iterations-per-epoch", type=int, help="training iterations per epoch (default 250)")
    p.add_argument("--folds", nargs="+", default=["all"], help="folds (default all five)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, help="random seed, 0 to 2**32-1 (default 0)")
    p.add_argument("--tta", action="store_true", help="mirroring for the cross-validation and the selection")
    p.add_argument("--select", action="store_true", help="run `select` when done")
    p.add_argument("--no-ensembles", action="store_true", help="with --select: single models only")
    p.add_argument("--events", help="append progress events (JSON lines) to this file")
    p.set_defaults(func=_cmd_finalize)

    s = subparsers.add_parser("select", help="choose the best model or ensemble and its postprocessing",
                              description="nnU-Net's selection on a finalized root: CV Dice of each candidate and "
                                          "pairwise ensemble, then largest-component postprocessing; writes "
                                          "nnU-Net's inference files and prints the table.")
    s.add_argument("root", type=Path, help="the selection root written by `autonnunet finalize`")
    s.add_argument("--no-ensembles", action="store_true", help="single models only")
    s.add_argument("--markdown", action="store_true", help="markdown tables")
    s.add_argument("--json", action="store_true", help="print selection.json instead of the table")
    s.add_argument("--report-only", action="store_true", help="print the table of the last selection")
    s.set_defaults(func=_cmd_select)
