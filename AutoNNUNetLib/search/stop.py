"""Stopping a worker cleanly, and recovering the trials of workers that died.

- :class:`StopControl` turns SIGTERM/SIGINT, the wall-clock deadline and a spent budget into
  :class:`SearchStopped`, raised in the worker's main thread; the trial being trained then goes
  back to pending (:func:`reset_own_trials`).
- A killed worker leaves its trial "evaluating" forever in NePS. :func:`recover_abandoned_trials`
  resets such trials (same host: the owner's pid is gone; any host: a stale heartbeat) and fails
  a trial whose workers died more than ``retries`` times.
"""

from __future__ import annotations

import contextlib
import os
import _thread
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

from ..events import ProgressCallback, ProgressEvent
from ..files import file_lock
from ..processes import pid_alive
from . import neps_adapter
from .layout import HEARTBEAT_NAME, RECOVERY_LOCK
from .records import read_attempts, read_trial_record, update_trial_record, write_attempts


class SearchStopped(BaseException):
    """Raised in a worker's main thread on SIGTERM/SIGINT, at the wall-clock limit or a spent budget.

    A ``BaseException`` so neither nnU-Net's nor NePS's ``except Exception`` handlers swallow it:
    it must unwind the worker, whose handler then returns the trial to "pending".
    """


class StopControl:
    """Turns SIGTERM/SIGINT and the wall-clock deadline into :class:`SearchStopped`.

    The exception is raised right away while a trial trains (that trial goes back to pending);
    otherwise the request is remembered and raised when the next trial would start, so NePS is
    never interrupted inside its own bookkeeping.
    """

    DEADLINE = "wall-clock limit reached"
    BUDGET = "budget spent"
    #: Reasons that end a search normally (a spent budget), not a stop by the user.
    FINISHED = (DEADLINE, BUDGET)

    def __init__(self, deadline: Optional[float]):
        self.deadline = deadline
        self.requested: Optional[str] = None
        self.in_trial = False
        self._previous: dict[int, Any] = {}
        self._timer: Optional[threading.Timer] = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only live in the main thread; rely on the deadline check
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.deadline is not None:
            self._timer = threading.Timer(max(0.0, self.deadline - time.time()), self._deadline_reached)
            self._timer.daemon = True
            self._timer.start()

    def uninstall(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _deadline_reached(self) -> None:
        self.requested = self.requested or self.DEADLINE
        if self.in_trial:
            # Deliver to the main thread, where the trial trains. interrupt_main runs our SIGTERM
            # handler there on every platform (signal.pthread_kill does not exist on Windows).
            _thread.interrupt_main(signal.SIGTERM)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = self.requested or f"stopped by {signal.Signals(signum).name}"
        if self.in_trial:
            self.in_trial = False  # raise once; the unwinding must not be interrupted again
            raise SearchStopped(self.requested)

    def check(self) -> None:
        if self.requested is None and self.deadline is not None and time.time() >= self.deadline:
            self.requested = self.DEADLINE
        if self.requested is not None:
            raise SearchStopped(self.requested)

    def budget_spent(self) -> None:
        """The next trial does not fit the budget: end this worker (a normal end)."""
        self.requested = self.requested or self.BUDGET
        raise SearchStopped(self.requested)


class Heartbeat:
    """Touches ``<trial>/heartbeat`` while a trial trains (other hosts judge liveness by it)."""

    def __init__(self, path: Path, interval: float = 30.0):
        self.path, self.interval = path, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Heartbeat":
        self.path.write_text(str(time.time()))
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                self.path.write_text(str(time.time()))


def _is_abandoned(trial: neps_adapter.TrialView, stale_after: float, now: float) -> bool:
    parts = str(trial.worker or "").split(":")
    if len(parts) >= 3 and parts[0] == socket.gethostname() and parts[1].isdigit():
        if int(parts[1]) == os.getpid():
            return False
        if not pid_alive(int(parts[1])):
            return True
    # Another host (or an id we did not make): judge by the heartbeat the trial writes.
    try:
        last = (trial.location / HEARTBEAT_NAME).stat().st_mtime
    except OSError:
        last = float(trial.time_started or now)
    return now - last > stale_after


def recover_abandoned_trials(
    root: Union[str, Path], *, retries: int = 1, stale_after: float = 900.0,
    events: Optional[ProgressCallback] = None,
) -> list[tuple[str, str]]:
    """Reset trials left "evaluating" by dead workers; fail them after ``retries`` retries.

    Returns ``(trial_id, "reset" | "failed")`` pairs.
    """
    root = Path(root)
    if not (root / "neps" / "optimizer_info.yaml").is_file():
        return []
    actions: list[tuple[str, str]] = []
    with file_lock(root / RECOVERY_LOCK):
        now = time.time()
        for trial in neps_adapter.read_trials(root).values():
            if trial.neps_state != "evaluating" or not _is_abandoned(trial, stale_after, now):
                continue
            attempts = read_attempts(trial.location)
            error = None
            if attempts > retries:
                error = (f"the worker evaluating this trial died {attempts} times "
                         f"(last: {trial.worker}); not retried again")
                neps_adapter.fail_trial(root, trial.trial_id, error, now)
                update_trial_record(trial.location, state="failed", error=error, finished=now)
                actions.append((trial.trial_id, "failed"))
            else:
                neps_adapter.reset_trial(root, trial.trial_id)
                update_trial_record(trial.location, state="pending", error="worker died; reset for a retry")
                actions.append((trial.trial_id, "reset"))
            if events is not None:
                action = actions[-1][1]
                events(ProgressEvent("trial_finished" if action == "failed" else "stage", {
                    "trial": trial.trial_id, "state": action, "name": "search",
                    "message": f"trial {trial.trial_id} abandoned by a dead worker: {action}",
                    **({"error": error} if error else {}),
                }))
    return actions


def reset_own_trials(root: Path, worker_id: str, reason: str) -> list[str]:
    """Return this worker's in-flight trials to pending (graceful stop)."""
    reset = []
    for trial in neps_adapter.read_trials(root).values():
        if trial.neps_state == "evaluating" and trial.worker == worker_id:
            neps_adapter.reset_trial(root, trial.trial_id)
            # A stop is not a failure: do not count this attempt against the retry limit (if this
            # worker got as far as counting it).
            if read_trial_record(trial.location).get("worker") == worker_id:
                write_attempts(trial.location, read_attempts(trial.location) - 1)
            update_trial_record(trial.location, state="pending", error=f"interrupted ({reason}); will be retrained")
            reset.append(trial.trial_id)
    return reset
