"""``autonnunet search``: flags (or ``--request FILE``) -> one :class:`SearchSettings` -> run_search.

Precedence: a stored search (resume) < ``--request FILE`` < explicit flags. A flag left out keeps
the value below it, so ``autonnunet search --root R --max-trials 40`` extends a search and keeps
everything else it was started with.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any, Optional

from ..events import ProgressEvent
from ..files import json_default, read_json
from ..progress import SearchProgress, format_duration, format_event
from ..states import EventKind
from .settings import (ARGV_FIELDS, CONFIDENCES, EXECUTORS, LAUNCHERS, OPTIMIZER_NAMES, PROFILES, SPACE_NAMES,
                       SearchError, SearchSettings)


class ProgressBar:
    """Renders search events as one updating line on a terminal (a line per trial otherwise).

    A view over the one fold (:class:`~AutoNNUNetLib.progress.SearchProgress`), with the log
    lines of :func:`~AutoNNUNetLib.progress.format_event`, so the terminal shows what Slicer and
    the server show.
    """

    #: Events that end a line of their own (the rest only refresh the bar on a terminal).
    LINE_KINDS = (EventKind.TRIAL_FINISHED, EventKind.STAGE, EventKind.FINISHED)

    def __init__(self, stream: Any = None, width: int = 24):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.progress = SearchProgress()

    def __call__(self, event: ProgressEvent) -> None:
        self.progress.update(event)
        if event.kind in self.LINE_KINDS:
            line = format_event(event)
            if line:
                self._line(line + (" (reused)" if event.data.get("reused_from") else ""), final=True)
        elif self.tty and event.kind in (EventKind.PROGRESS, EventKind.BEST, EventKind.TRIAL_STARTED,
                                         EventKind.EPOCH):
            self._line(self._bar(), final=False)

    def _bar(self) -> str:
        state = self.progress
        fraction = state.fraction or 0.0
        filled = int(round(fraction * self.width))
        eta = f" ETA {format_duration(state.eta_seconds)}" if state.eta_seconds is not None else ""
        best = f" best {state.best_dice:.4f}" if state.best_dice is not None else ""
        current = ""
        if state.trial is not None:
            current = f" trial {state.trial}"
            if state.epoch is not None:
                current += f" epoch {state.epoch}" + (f"/{state.max_epochs}" if state.max_epochs else "")
            elif state.trial_epochs is not None:
                current += f" ({state.trial_epochs} ep)"
        return f"[{'#' * filled}{'-' * (self.width - filled)}] {fraction:4.0%}{best}{eta}{current}"

    def _line(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()


def _gpus(values: Optional[list[str]]) -> Optional[list[str]]:
    if values is None:
        return None
    return [] if values == ["none"] else values


def _slurm(values: Optional[list[str]]) -> Optional[dict[str, Any]]:
    if values is None:
        return None
    parsed: dict[str, Any] = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SearchError(f"slurm: expected KEY=VALUE, got {item!r}")
        try:
            parsed[key] = json.loads(text)
        except ValueError:
            parsed[key] = text
    return parsed


def settings_from_args(args: argparse.Namespace, stored: Optional[dict[str, Any]]) -> SearchSettings:
    """The request record: stored settings (resume), then ``--request``, then the flags given."""
    values: dict[str, Any] = dict(stored or {})
    if getattr(args, "request", None):
        request = read_json(args.request)
        if not isinstance(request, dict):
            raise SearchError(f"--request {args.request}: not a JSON object of search settings")
        values.update(request)
    flags = {name: getattr(args, name, None) for name in ARGV_FIELDS}
    flags["gpus"] = _gpus(args.gpus)
    flags["slurm"] = _slurm(args.slurm)
    if args.configurations is not None:
        flags["configurations"] = [c for value in args.configurations for c in value.split(",") if c]
    if args.slurm_partition:
        flags["slurm"] = {**(flags["slurm"] or values.get("slurm") or {}), "slurm_partition": args.slurm_partition}
    given = {k: v for k, v in flags.items() if v is not None}
    if "profile" in given and not stored:
        # A new profile re-derives the fields it fills unless they are given explicitly.
        for name in PROFILES[given["profile"]] if given["profile"] in PROFILES else ():
            values.pop(name, None)
    values.update(given)
    return SearchSettings.from_dict(values)


def _log_stage(event: ProgressEvent) -> None:
    import logging

    if event.data.get("message"):
        logging.getLogger(__name__).info("%s", event.data["message"])


def _cmd_search(args: argparse.Namespace) -> int:
    from ..workspace import Workspace
    from .run import EVENTS_NAME, SETTINGS_NAME, estimate_search, prepare_workspace, run_search
    from .worker import tail_events

    root = Path(args.root)
    stored = read_json(root / SETTINGS_NAME)
    if args.source is not None and args.workdir is None and stored is None:
        raise SearchError("--source needs --workdir: the folder where the dataset is built and planned")
    if stored is not None and args.workdir is None:
        workspace = Workspace(Path(stored["workspace"]), stored.get("dataset"))
    elif args.workdir is None:
        raise SearchError("--workdir is required for a new search")
    else:
        workspace = Workspace(Path(args.workdir), args.dataset)
    settings = settings_from_args(args, stored["settings"] if stored else None)
    if settings.workers > 1 and settings.launcher == "inline":
        settings = settings.replace(launcher="submitit")
    if args.source is not None and stored is None:
        # After the settings were checked: a typo in a flag fails before minutes of preprocessing.
        prepare_workspace(args.source, args.workdir, args.dataset, progress=_log_stage,
                          configurations=settings.configurations or ("3d_fullres",))
    if args.estimate_only:
        estimate = estimate_search(workspace, settings)
        print(json.dumps(estimate.to_dict(), indent=2) if args.json else estimate.text)
        return 0
    bar = None if args.quiet else ProgressBar()
    if settings.workers > 1 and bar is not None:
        # Workers are other processes: follow their events file.
        stop = threading.Event()
        root.mkdir(parents=True, exist_ok=True)
        tail = threading.Thread(target=tail_events, args=(root.resolve() / EVENTS_NAME, bar, stop), daemon=True)
        tail.start()
        try:
            results = run_search(workspace, root, settings, progress=None)
        finally:
            stop.set()
            tail.join(timeout=5)
    else:
        results = run_search(workspace, root, settings, progress=bar)
    if args.json:
        print(json.dumps(results.to_dict(), indent=2, default=json_default))
    else:
        print(results.to_text())
    return 0 if results.state == "finished" else 3


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", help="workspace (planned and preprocessed); optional when resuming")
    parser.add_argument("--source", help="MSD or nnU-Net raw folder: build and plan --workdir from it first "
                                         "(skipped for what the workspace already has)")
    parser.add_argument("--dataset", help="dataset name when the workspace holds several")
    parser.add_argument("--root", required=True, help="search root directory")
    parser.add_argument("--request", help="a JSON file of search settings (SearchSettings.to_dict); flags override it")
    parser.add_argument("--space", choices=SPACE_NAMES)
    parser.add_argument("--profile", choices=tuple(PROFILES), help="defaults: default (GPU) or quick (CPU/tests)")
    parser.add_argument("--min-epochs", type=int)
    parser.add_argument("--max-epochs", type=int, help="F: the final training length (nnU-Net: 1000)")
    parser.add_argument("--eta", type=int)
    parser.add_argument("--prior-confidence", choices=CONFIDENCES)
    parser.add_argument("--prior-first", action=argparse.BooleanOptionalAction, default=None,
                        help="train nnU-Net's default to F first (as the reference; on with --budget)")
    parser.add_argument("--portfolio", action=argparse.BooleanOptionalAction, default=None,
                        help="warm start from the reference's incumbents on other datasets (on with --budget)")
    parser.add_argument("--budget", type=float,
                        help="budget in units of F (one default training to --max-epochs), final model included")
    parser.add_argument("--total-epochs", type=int, help="budget: epochs trained in total")
    parser.add_argument("--max-trials", type=int, help="budget: number of trials")
    parser.add_argument("--wall-time", type=float, help="budget: seconds for this run")
    parser.add_argument("--folds", nargs="+", help="folds per configuration (default 0; 'all' = 5-fold mean)")
    parser.add_argument("--confirm-fold", type=int, help="after the search: incumbent and default to F on this fold")
    parser.add_argument("--confirm-seeds", type=int, help="seeds per confirmation training (default 2)")
    parser.add_argument("--iterations-per-epoch", type=int)
    parser.add_argument("--max-validation-cases", type=int)
    parser.add_argument("--runtime-weight", type=float, help="0 = plain PriorBand; default 1 (Regularized)")
    parser.add_argument("--optimizer", choices=OPTIMIZER_NAMES)
    parser.add_argument("--configuration", default=None,
                        help="nnU-Net configuration of the prior (default 3d_fullres, nnU-Net's default)")
    parser.add_argument("--configurations", nargs="+", default=None,
                        help="search the configuration too, among these planned ones (e.g. 2d 3d_fullres or "
                             "2d,3d_fullres); default: only --configuration")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--gpus", nargs="+", help="GPU ids to spread workers over (default: the visible ones)")
    parser.add_argument("--launcher", choices=LAUNCHERS)
    parser.add_argument("--executor", choices=EXECUTORS)
    parser.add_argument("--slurm", action="append", metavar="KEY=VALUE", help="a submitit Slurm parameter")
    parser.add_argument("--slurm-partition")
    parser.add_argument("--device")
    parser.add_argument("--retries", type=int, help="retries of a trial whose worker died (default 1)")
    parser.add_argument("--stale-after", type=float, help="seconds without heartbeat before a trial is abandoned")
    parser.add_argument("--events", help="also append progress events to this file")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--final-folds", nargs="+", help="retrain the incumbent at full fidelity on these folds")
    parser.add_argument("--estimate-only", action="store_true", help="print the cost estimate and exit")
    parser.add_argument("--json", action="store_true", help="print results.json instead of a summary")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cmd_search)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser of the ``search`` flags (for :meth:`SearchSettings.from_argv`)."""
    parser = argparse.ArgumentParser(prog="autonnunet search")
    _add_arguments(parser)
    return parser


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "search", help="PriorBand search over nnU-Net configurations (resumable)",
        description="Search nnU-Net hyperparameters/architectures with (Regularized) PriorBand. "
                    "Rerun with the same --root to resume; SIGTERM/Ctrl-C stops cleanly.")
    _add_arguments(parser)
