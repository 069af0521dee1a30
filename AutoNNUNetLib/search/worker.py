"""NePS workers: one in this process, or several (processes or submitit jobs) on one root.

Each worker of a multi-worker search gets one GPU through ``CUDA_VISIBLE_DEVICES``, taken from the
GPUs this process was given (:func:`AutoNNUNetLib.devices.visible_gpus`): with
``CUDA_VISIBLE_DEVICES=2,3`` the workers get ``2`` and ``3``, never another job's ``0`` and ``1``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from ..devices import visible_gpus, worker_environment
from ..events import ProgressCallback, ProgressEvent, read_events
from ..workspace import Workspace
from . import neps_adapter
from .layout import neps_root
from .settings import SearchSettings
from .stop import SearchStopped, StopControl, reset_own_trials
from .trial import TrialRunner

log = logging.getLogger(__name__)


def worker_id(index: int) -> str:
    # host:pid lets another worker on the same host tell whether the owner of a trial is alive;
    # the random tail keeps ids unique when one process runs several searches (NePS refuses reuse).
    import uuid

    return f"{socket.gethostname()}:{os.getpid()}:{index}:{uuid.uuid4().hex[:8]}"


def search_gpus(settings: SearchSettings, environ: Optional[Mapping[str, str]] = None,
                device_count: Optional[int] = None) -> list[str]:
    """The GPU ids the workers of a search are spread over (none for a CPU search)."""
    if settings.device == "cpu" or settings.device == "mps":
        return []
    if settings.gpus is not None:
        return list(settings.gpus)
    return visible_gpus(environ, device_count)


def worker_overlay(settings: SearchSettings, index: int, environ: Optional[Mapping[str, str]] = None,
                   device_count: Optional[int] = None) -> dict[str, str]:
    """The environment variables worker ``index`` sets for itself."""
    environ = os.environ if environ is None else environ
    overlay = {"nnUNet_compile": environ.get("nnUNet_compile", "false")}
    if "SLURM_JOB_ID" in environ:
        return overlay  # Slurm already gave this job its own GPU
    if ":" in settings.device:
        return overlay  # an explicit cuda:N names a device of the visible set; keep that set
    overlay.update(worker_environment(index, search_gpus(settings, environ, device_count)))
    return overlay


def configure_worker_environment(settings: SearchSettings, index: int) -> None:
    os.environ.update(worker_overlay(settings, index))


def run_worker(
    workspace: Workspace,
    root: Union[str, Path],
    settings: SearchSettings,
    *,
    index: int = 0,
    session_start: Optional[float] = None,
    trainer: Optional[Callable[..., Any]] = None,
) -> str:
    """Run one NePS worker on ``root`` until a budget is spent or it is stopped.

    Returns ``"finished"`` (a budget, the wall-clock limit included, is spent) or ``"stopped"``
    (SIGTERM/SIGINT). Either way the trial in training goes back to pending.
    """
    import neps

    from .budget import plan_for
    from .run import make_optimizer, make_space

    root = Path(root)
    session_start = session_start or time.time()
    wid = worker_id(index)
    deadline = session_start + settings.wall_time if settings.wall_time else None
    stop = StopControl(deadline)
    plan = plan_for(settings)
    runner = TrialRunner(
        workspace_root=str(workspace.root), dataset_name=workspace.require_dataset(), root=str(root),
        settings=settings, worker_id=wid, session_start=session_start, stop=stop, trainer=trainer,
        rung_epochs=sorted(plan.rungs.values()), epoch_cap=_epoch_cap(root, plan),
    )

    if settings.seed is not None:
        # NePS snapshots the global RNG state when it creates the search state; seed it first.
        import random

        import numpy as np

        random.seed(settings.seed)
        np.random.seed(settings.seed)

    stop.install()
    try:
        with warnings.catch_warnings():
            # With only a wall-clock budget NePS warns it would run forever; our deadline stops it.
            warnings.filterwarnings("ignore", message="None of the following were set")
            neps.run(
                evaluate_pipeline=runner,
                pipeline_space=make_space(settings, workspace),
                root_directory=str(neps_root(root)),
                optimizer=make_optimizer(settings, workspace),
                total_cost_to_spend=plan.search_epochs if plan.budget else settings.effective_total_epochs(),
                total_evaluations_to_spend=settings.max_trials,
                ignore_errors=True,  # a failing configuration is recorded; the search goes on
                worker_id=wid,
            )
        return "finished"
    except SearchStopped as stopped:
        neps_adapter.clear_running_mark()
        reset = reset_own_trials(root, wid, str(stopped))
        runner.emit(ProgressEvent("stage", {
            "name": "search", "message": f"worker {wid} stopped ({stopped}); "
                                         f"returned to pending: {', '.join(reset) or 'none'}"}))
        return "finished" if str(stopped) in StopControl.FINISHED else "stopped"
    finally:
        stop.uninstall()


def _epoch_cap(root: Path, plan: Any) -> Optional[int]:
    """What the trials may train in all: the plan's, less final trainings of earlier runs."""
    if plan.budget is None:
        return None
    from ..files import read_json
    from .layout import RESULTS_NAME

    final = (read_json(root / RESULTS_NAME) or {}).get("final") or {}
    return plan.search_epochs - int(final.get("epochs_trained_total") or 0)


def worker_entry(payload: dict[str, Any], index: int) -> str:
    """Entry point of a worker process (plain process or submitit job)."""
    settings = SearchSettings.from_dict(payload["settings"])
    configure_worker_environment(settings, index)
    root = Path(payload["root"])
    logs = root / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=str(logs / f"worker_{index}_{os.getpid()}.log"), level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True,
    )
    workspace = Workspace(Path(payload["workspace"]), payload.get("dataset"))
    return run_worker(workspace, root, settings, index=index, session_start=payload.get("session_start"))


def run_inline(workspace: Workspace, root: Path, settings: SearchSettings, session_start: float,
               trainer: Optional[Callable[..., Any]], progress: Optional[ProgressCallback], events: Path) -> str:
    """One worker in this process; ``progress`` also gets the worker's events."""
    configure_worker_environment(settings, 0)
    if progress is None:
        return run_worker(workspace, root, settings, session_start=session_start, trainer=trainer)
    stop = threading.Event()
    tail = threading.Thread(target=tail_events, args=(events, progress, stop), daemon=True)
    tail.start()
    try:
        return run_worker(workspace, root, settings, session_start=session_start, trainer=trainer)
    finally:
        stop.set()
        tail.join(timeout=5)


def tail_events(path: Path, callback: ProgressCallback, stop: threading.Event, interval: float = 0.5) -> None:
    """Forward events appended to ``path`` (except stage/finished, which callers get directly)."""
    offset = path.stat().st_size if path.exists() else 0
    while True:
        events, offset = read_events(path, offset)
        for event in events:
            if event.kind not in ("stage", "finished"):
                callback(event)
        if stop.is_set():
            break
        stop.wait(interval)


def run_workers(workspace: Workspace, root: Path, settings: SearchSettings, session_start: float) -> str:
    """Start ``settings.workers`` worker processes on ``root`` and wait for all of them."""
    payload = {"settings": settings.to_dict(), "root": str(root), "workspace": str(workspace.root),
               "dataset": workspace.require_dataset(), "session_start": session_start}
    stop_requested: list[str] = []

    def request_stop(signum: int, frame: Any) -> None:
        stop_requested.append(signal.Signals(signum).name)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if settings.launcher == "submitit":
            outcomes = _run_submitit(payload, settings, root, stop_requested)
        else:
            outcomes = _run_processes(payload, settings, stop_requested)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return "stopped" if stop_requested or "stopped" in outcomes else "finished"


def _run_processes(payload: dict, settings: SearchSettings, stop_requested: list[str]) -> list[str]:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker_entry, args=(payload, i), name=f"autonnunet-worker-{i}")
                 for i in range(settings.workers)]
    for process in processes:
        process.start()
    forwarded = False
    while any(p.is_alive() for p in processes):
        if stop_requested and not forwarded:
            for process in processes:
                if process.is_alive() and process.pid:
                    os.kill(process.pid, signal.SIGTERM)
            forwarded = True
        time.sleep(0.5)
    for process in processes:
        process.join()
    return ["finished" if p.exitcode == 0 else "stopped" for p in processes]


def _run_submitit(payload: dict, settings: SearchSettings, root: Path, stop_requested: list[str]) -> list[str]:
    import submitit

    folder = root / "submitit"
    if settings.executor == "slurm":
        executor: Any = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = {"timeout_min": int(math.ceil((settings.wall_time or 3 * 86400) / 60)) + 10,
                  "slurm_gpus_per_node": 1 if settings.device != "cpu" else 0,
                  **settings.slurm}
        executor.update_parameters(**params)
    else:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=int(math.ceil((settings.wall_time or 30 * 86400) / 60)) + 10)
    jobs = [executor.submit(worker_entry, payload, i) for i in range(settings.workers)]
    cancelled = False
    while not all(job.done() for job in jobs):
        if stop_requested and not cancelled:
            for job in jobs:
                with contextlib.suppress(Exception):
                    job.cancel(check=False)  # local: SIGINT; slurm: scancel -> SIGTERM
            cancelled = True
        time.sleep(1.0)
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(job.result())
        except Exception as error:  # noqa: BLE001 - one worker's failure is reported, not fatal
            log.error("worker job %s failed: %s", job.job_id, error)
            outcomes.append("stopped")
    return outcomes
