"""Process helpers: liveness (zombies count as gone), group membership, stopping whole trees."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from AutoNNUNetLib.processes import (
    kill_process_group, kill_process_tree, pid_alive, process_group_members, signal_group,
)

PY = sys.executable
# A leader that starts a grandchild ignoring SIGTERM, prints its pid, then sleeps.
TREE = ("import signal, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        "print(child.pid, flush=True); time.sleep(600)")


def _start_tree() -> tuple[subprocess.Popen, int]:
    leader = subprocess.Popen([PY, "-c", TREE], stdout=subprocess.PIPE, text=True, start_new_session=True)
    grandchild = int(leader.stdout.readline())
    return leader, grandchild


def test_a_zombie_is_not_alive():
    process = subprocess.Popen([PY, "-c", "pass"])
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{process.pid}") and pid_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(process.pid)  # exited, not yet reaped: a zombie
    process.wait()
    assert not pid_alive(process.pid)
    assert pid_alive(os.getpid())


def test_kill_process_group_escalates_to_sigkill():
    leader, grandchild = _start_tree()
    try:
        assert sorted(process_group_members(leader.pid)) == sorted([leader.pid, grandchild])
        assert kill_process_group(leader.pid, grace=0.5, reap=leader.poll) is True
        assert process_group_members(leader.pid) == []
        assert leader.returncode == -signal.SIGTERM and not pid_alive(grandchild)
    finally:
        signal_group(leader.pid, hard=True)


def test_kill_process_tree_and_own_group_is_never_signalled():
    signal_group(os.getpgid(0))  # must be a no-op: this test process is still here to assert it
    leader, grandchild = _start_tree()
    kill_process_tree(leader.pid, timeout=0.5)
    leader.wait(timeout=10)
    deadline = time.monotonic() + 10
    while pid_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(grandchild)
