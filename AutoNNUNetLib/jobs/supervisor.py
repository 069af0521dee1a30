"""The supervisor: ``python -m AutoNNUNetLib.jobs supervise JOB_DIR``.

It runs a job folder's steps in order as its own children, inside the job's process group, and
records how the job ended in ``exit.json``. It does not depend on whoever started it: a job keeps
running when the server (or Slicer) that started it exits, and the starter re-attaches from the
folder (:meth:`.local.LocalJob.open`). Steps are written so that a re-run resumes: preparation
steps leave a marker and are skipped, and the search is NePS's, which continues its root folder.

With ``executor="slurm"`` the worker steps go to a Slurm cluster through submitit (same command,
one Slurm job per worker with one GPU each); the supervisor stays here and waits for them.

Standard library only at the top: it must start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from ..events import EventWriter
from ..files import atomic_write_json, file_lock
from ..processes import IS_WINDOWS
from ..states import EventKind, JobState
from .builtins import BUILTINS, find_model_dir
from .spec import CANCEL_NAME, EVENTS_NAME, LOG_NAME, MODEL_DIR_PREFIX, JobExit, JobSpec, Step, write_exit

#: Seconds the supervisor gives its children between the graceful stop and a kill of its own.
CHILD_GRACE_SECONDS = 5.0


class _Cancelled(Exception):
    pass


def child_creation_flags() -> dict[str, Any]:
    """Popen arguments for a step's process: on Windows no console window (a visible console
    would kill the job when closed) and its own console group, so the supervisor can send it a
    CTRL_BREAK (a graceful stop) without breaking itself."""
    if IS_WINDOWS:
        return {"creationflags": subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]
    return {}


class Supervisor:
    """Runs a job's steps in order inside the job's process group and records how it ended."""

    def __init__(self, job_dir: Union[str, Path]):
        self.spec = JobSpec.load(job_dir)
        self.dir = self.spec.dir
        self.events = EventWriter(self.dir / EVENTS_NAME)
        self.children: list[subprocess.Popen] = []
        self.slurm_jobs: list[Any] = []
        self.stop_signal: Optional[int] = None

    @staticmethod
    def child_flags() -> dict[str, Any]:
        return child_creation_flags()

    # Signals: the canceller sends SIGTERM to the whole group, so children get it directly; the
    # supervisor forwards it anyway (someone may signal only the supervisor) and cancels cluster
    # jobs, which are outside the group.
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum
        self._forward_stop()

    def _forward_stop(self) -> None:
        stop = signal.CTRL_BREAK_EVENT if IS_WINDOWS else signal.SIGTERM  # type: ignore[attr-defined]
        for child in self.children:
            with contextlib.suppress(ProcessLookupError, OSError):
                child.send_signal(stop)

    def run(self) -> int:
        for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGBREAK"):  # the last two exist on POSIX / Windows only
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._on_signal)
        print(f"[autonnunet job] supervisor pid {os.getpid()} in {self.dir}", flush=True)
        try:
            for step in self.spec.steps:
                self._check_stop()
                code = self._run_step(step)
                if code != 0:
                    self._check_stop()
                    if step.optional:
                        print(f"[autonnunet job] optional step {step.name} failed (exit code {code}); going on",
                              flush=True)
                        continue
                    return self._finish(JobState.FAILED, code, f"step '{step.name}' failed with exit code {code}")
            return self._finish(JobState.SUCCEEDED, 0, "")
        except _Cancelled:
            self._stop_everything()
            return self._finish(JobState.CANCELLED, 128 + int(self.stop_signal or signal.SIGTERM), "cancelled")
        except Exception as error:  # a bug or an unusable spec: record it, don't vanish silently
            self._stop_everything()
            return self._finish(JobState.FAILED, 1, f"{type(error).__name__}: {error}")

    def _check_stop(self) -> None:
        # A cancel file is the cross-platform request (a GUI process on Windows cannot signal a
        # hidden console); a signal is the POSIX one.
        if self.stop_signal is None and (self.dir / CANCEL_NAME).exists():
            self.stop_signal = int(signal.SIGTERM)
            self._forward_stop()
        if self.stop_signal is not None:
            raise _Cancelled()

    def _finish(self, state: JobState, code: int, message: str) -> int:
        self.events.emit(EventKind.FINISHED, state=state, message=message)
        write_exit(self.dir, JobExit(state, code, message))
        print(f"[autonnunet job] {state}" + (f": {message}" if message else ""), flush=True)
        return 0 if state == JobState.SUCCEEDED else (code or 1)

    def _stop_everything(self) -> None:
        for job in self.slurm_jobs:
            with contextlib.suppress(Exception):
                job.cancel(check=False)
        self._forward_stop()
        deadline = time.monotonic() + CHILD_GRACE_SECONDS
        for child in self.children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()

    @contextlib.contextmanager
    def _lock(self, path: Optional[str]) -> Iterator[None]:
        if path is None:
            yield
            return
        # Polls so a cancel is noticed while waiting for another job's step.
        with file_lock(path, poll=self._check_stop):
            yield

    def _run_step(self, step: Step) -> int:
        if step.done_marker and Path(step.done_marker).exists():
            print(f"[autonnunet job] step {step.name}: already done, skipped", flush=True)
            return 0
        with self._lock(step.lock):
            if step.done_marker and Path(step.done_marker).exists():  # done by another job meanwhile
                return 0
            self.events.emit(EventKind.STAGE, name=step.name, message=step.message or step.name)
            print(f"[autonnunet job] step {step.name}", flush=True)
            if step.builtin:
                BUILTINS[step.builtin](self, **step.kwargs)
                code = 0
            elif step.remote and self.spec.executor in ("slurm", "submitit-local"):
                code = self._run_submitit(step)
            else:
                code = self._run_local(step)
            if code in step.ok_codes:
                code = 0
            if code == 0 and step.done_marker:
                atomic_write_json(step.done_marker, {"time": time.time(), "job": str(self.dir)})
        return code

    def _command(self, step: Step) -> list[str]:
        if step.command:
            return list(step.command)
        argv = [str(find_model_dir(a[len(MODEL_DIR_PREFIX):])) if a.startswith(MODEL_DIR_PREFIX) else a
                for a in step.argv]
        return [self.spec.python, "-m", "AutoNNUNetLib", *argv]

    @staticmethod
    def _worker_envs(step: Step) -> list[dict[str, str]]:
        return step.workers if step.workers else [{}]

    def _run_local(self, step: Step) -> int:
        command = self._command(step)
        self.children = []
        overlays = self._worker_envs(step)
        for index, overlay in enumerate(overlays):
            env = {**os.environ, **self.spec.env, **step.env, **overlay}
            if len(overlays) > 1:
                print(f"[autonnunet job] worker {index}: {overlay}", flush=True)
            # Children inherit our stdout (the job log) and our process group.
            self.children.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, **self.child_flags()))
        codes: list[Optional[int]] = [None] * len(self.children)
        while any(code is None for code in codes):
            self._check_stop()
            for i, child in enumerate(self.children):
                if codes[i] is None:
                    codes[i] = child.poll()
            time.sleep(0.2)
        self.children = []
        return next((code for code in codes if code), 0)

    def _run_submitit(self, step: Step) -> int:
        import submitit

        folder = self.dir / "submitit"
        cluster = "local" if self.spec.executor == "submitit-local" else "slurm"
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        opts = self.spec.slurm
        params: dict[str, Any] = {"timeout_min": opts.timeout_min, "name": f"autonnunet-{self.dir.name}"}
        if cluster == "slurm":
            params.update(slurm_partition=opts.partition, cpus_per_task=opts.cpus_per_task,
                          gpus_per_node=opts.gpus_per_node, tasks_per_node=1,
                          slurm_additional_parameters=dict(opts.additional))
            if opts.mem_gb:
                params["mem_gb"] = opts.mem_gb
            params = {k: v for k, v in params.items() if v is not None}
        executor.update_parameters(**params)
        ids_file = self.dir / "submitit_jobs.json"
        self.slurm_jobs = []
        # A re-run supervisor (after a server restart) waits for the workers it already submitted
        # instead of submitting a second set onto the same search root.
        if cluster == "slurm" and ids_file.exists():
            previous = json.loads(ids_file.read_text())
            if previous.get("step") == step.name:
                jobs = [submitit.SlurmJob(folder=str(folder), job_id=job_id) for job_id in previous["ids"]]
                if not any(job.done() for job in jobs):
                    self.slurm_jobs = jobs
        if not self.slurm_jobs:
            for overlay in self._worker_envs(step):
                # On Slurm the GPU is Slurm's to assign: drop our CUDA_VISIBLE_DEVICES choice.
                env = {**self.spec.env, **step.env, **overlay}
                if cluster == "slurm":
                    env.pop("CUDA_VISIBLE_DEVICES", None)
                self.slurm_jobs.append(
                    executor.submit(run_worker, self._command(step), env, str(self.dir / LOG_NAME)))
            atomic_write_json(ids_file, {"step": step.name, "ids": [j.job_id for j in self.slurm_jobs]})
        print(f"[autonnunet job] submitted {cluster} jobs {[j.job_id for j in self.slurm_jobs]}", flush=True)
        while not all(job.done() for job in self.slurm_jobs):
            self._check_stop()
            time.sleep(1.0)
        code = 0
        for job in self.slurm_jobs:
            try:
                job.result()
            except Exception as error:
                print(f"[autonnunet job] worker {job.job_id} failed: {error}", flush=True)
                code = 1
        self.slurm_jobs = []
        return code


def run_worker(command: list[str], env_overlay: dict[str, str], log_path: str) -> int:
    """Body of a submitit worker: run one command, output appended to the job log.

    Module-level so submitit can pickle it by reference (the cluster node imports this module from
    the same installation, which is why the data directory and the environment must be shared).
    """
    env = {**os.environ, **env_overlay, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        code = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if code != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited with code {code}")
    return code


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m AutoNNUNetLib.jobs")
    sub = parser.add_subparsers(dest="command", required=True)
    sup = sub.add_parser("supervise", help="run a job folder's steps (started by LocalJob)")
    sup.add_argument("job_dir")
    args = parser.parse_args(argv)
    return Supervisor(args.job_dir).run()


if __name__ == "__main__":
    sys.exit(main())
