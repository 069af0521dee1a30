"""Process helpers shared by every runner: is a pid alive, who is in a process group, stop a tree.

Searches, server jobs and the Slicer module's background runs all start their child as the leader
of a new process group (session), so the group holds every descendant (NePS workers, nnU-Net data
loaders) and can be stopped as a whole. Standard library only: the Slicer module and the job
server import this without numpy or torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

#: Seconds a stopped child gets between SIGTERM and SIGKILL: a search uses them to put its running
#: trial back to pending, so a later resume continues cleanly.
CANCEL_GRACE_SECONDS = 10.0

IS_WINDOWS = os.name == "nt"


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    if IS_WINDOWS:
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:  # Linux: the state follows "(name) "
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        pass
    try:  # macOS has no /proc; psutil (a dependency) still tells zombies apart
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001 - no psutil, or the process ended meanwhile
        return True


def _windows_pid_alive(pid: int) -> bool:
    # os.kill(pid, 0) would terminate the process on Windows; ask the kernel instead.
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def process_group_members(pgid: int) -> list[int]:
    """Pids whose process group is ``pgid`` (zombies included: they are not gone yet)."""
    if IS_WINDOWS:  # no process groups to list; the leader stands for its tree
        return [pgid] if pid_alive(pgid) else []
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        rest = stat[stat.rfind(")") + 2:].split()
        if len(rest) > 2 and int(rest[2]) == pgid:
            members.append(int(entry.name))
    return members


def signal_group(pgid: int, hard: bool = False) -> None:
    """SIGTERM (SIGKILL with ``hard``) to a process group; on Windows end the leader's tree.

    Never signals the caller's own group (inside Slicer that would be Slicer itself).
    """
    if IS_WINDOWS:
        subprocess.call(["taskkill", "/T", "/F", "/PID", str(pgid)], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        return
    if pgid == os.getpgid(0):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL if hard else signal.SIGTERM)


def signal_pid(pid: int, hard: bool = False) -> None:
    """SIGTERM (SIGKILL with ``hard``) to one process, ignoring one that is already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL if hard else signal.SIGTERM)


def kill_process_group(pgid: int, grace: float = CANCEL_GRACE_SECONDS,
                       reap: Optional[Callable[[], Any]] = None) -> bool:
    """SIGTERM the group, SIGKILL what is left after ``grace`` seconds; True when the group is gone.

    ``reap`` is called while waiting so the caller can collect its own child (a zombie still
    counts as a member of the group).
    """
    def gone() -> bool:
        if reap is not None:
            reap()
        return not process_group_members(pgid)

    for hard, wait in ((False, grace), (True, 10.0)):
        signal_group(pgid, hard)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if gone():
                return True
            time.sleep(0.05)
    return gone()


def kill_process_tree(pid: int, timeout: float = 5.0) -> None:
    """Stop a process and every process it started, blocking up to about ``timeout`` seconds.

    The process group of ``pid`` gets SIGTERM, then SIGKILL for whatever is left after
    ``timeout``. Descendants found through psutil (when installed) are signalled too, in case one
    left the group. On Windows ``taskkill /T`` walks the tree.
    """
    if IS_WINDOWS:
        signal_group(pid, hard=True)
        return
    descendants: list[int] = []
    try:
        import psutil  # a dependency of the library (Slicer does not ship it); guarded all the same

        descendants = [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - no psutil, or the process is already gone
        pass
    try:
        pgid: Optional[int] = os.getpgid(pid)
    except ProcessLookupError:
        pgid = None
    for hard in (False, True):
        if pgid is not None:
            signal_group(pgid, hard)  # a no-op for our own group
        for target in [pid, *descendants]:
            signal_pid(target, hard)
        if not hard:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(pid_alive(p) for p in [pid, *descendants]):
                time.sleep(0.05)
