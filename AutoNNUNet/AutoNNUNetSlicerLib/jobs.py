"""The module's running jobs: local ones (``jobs.LocalJob``) and remote ones (``remote.job.RemoteJob``).

Both follow the library's one Job protocol (poll -> JobUpdate, cancel, wait, job_id). What this
file adds is what the *module* needs around them:

- a :class:`JobContext` fixed when the job starts: its working folder, search root, output file,
  the reference volume *node* a prediction lands on. When the job ends, the module reads the
  context, never the current scene's parameter node (which a scene close replaced);
- the progress fold (:class:`AutoNNUNetLib.progress.SearchProgress`) and the log text of each
  job, kept per job (a prediction's log does not land in the search's);
- :meth:`JobBoard.close_scene`: jobs that hold scene nodes (predictions) are cancelled when the
  scene closes, since their nodes are gone;
- the local job folders: one folder per job under ``<working folder>/jobs/`` with the request
  the child reads (``--request FILE``), its log and its events.

No Slicer import: Testing/slicer/ runs real local jobs through this file.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from AutoNNUNetLib.progress import SearchProgress
from AutoNNUNetLib.states import JobState

#: ``autonnunet search`` exits with 3 when its wall time ran out: stopped, resumable.
SEARCH_STOPPED_EXIT = 3


@dataclass
class JobContext:
    """Everything a job's end needs, fixed at its start."""

    kind: str
    work_dir: Path
    search_root: Optional[Path] = None
    model_dir: Optional[Path] = None
    output_file: Optional[Path] = None  # predict: the label map the child writes
    reference_volume: Any = None  # predict: the input node itself, not its ID (IDs restart after a close)
    output_segmentation: Any = None  # predict: the node to fill (None: a new one)
    classes: dict[str, int] = field(default_factory=dict)
    looks: dict[str, Any] = field(default_factory=dict)  # predict: class -> terminology.SegmentLook
    show_3d: bool = True
    download_dir: Optional[Path] = None  # remote: where model.zip and results.json arrive
    remote: bool = False

    @property
    def holds_nodes(self) -> bool:
        return self.reference_volume is not None or self.output_segmentation is not None

    def release_nodes(self) -> None:
        self.reference_volume = None
        self.output_segmentation = None


@dataclass
class ModuleJob:
    """A job as the module shows it: the job, its context, its progress and its own log."""

    kind: str
    job: Any  # a LocalJob or a RemoteJob
    context: JobContext
    progress: SearchProgress = field(default_factory=SearchProgress)
    state: JobState = JobState.QUEUED
    message: str = ""
    exit_code: Optional[int] = None
    log: str = ""
    cancelled_by_scene_close: bool = False

    @property
    def done(self) -> bool:
        return JobState(self.state).done

    @property
    def log_location(self) -> str:
        """Where the job's full log is: its local job folder, or the runner's job."""
        if self.context.remote:
            return f"the runner's job {getattr(self.job, 'job_id', '')} (autonnunet remote logs)"
        return str(getattr(self.job, "log_path", "") or self.context.work_dir / "jobs")

    @property
    def stopped(self) -> bool:
        """A search that ended early on its wall time (its folder resumes)."""
        return self.kind == "search" and self.state == JobState.SUCCEEDED and self.exit_code == SEARCH_STOPPED_EXIT


class JobBoard:
    """The module's jobs by kind (one running job per kind), polled from a QTimer."""

    def __init__(self) -> None:
        self.jobs: dict[str, ModuleJob] = {}

    def add(self, kind: str, job: Any, context: JobContext) -> ModuleJob:
        if self.running(kind):
            raise RuntimeError(f"a {kind} job is already running")
        entry = self.jobs[kind] = ModuleJob(kind, job, context)
        return entry

    def get(self, kind: str) -> Optional[ModuleJob]:
        return self.jobs.get(kind)

    def running(self, kind: str) -> bool:
        entry = self.jobs.get(kind)
        return entry is not None and not entry.done

    def any_running(self) -> bool:
        return any(not entry.done for entry in self.jobs.values())

    def poll(self) -> list[tuple[ModuleJob, Any]]:
        """``(job, JobUpdate)`` for every job that was running; never blocks."""
        updates = []
        for entry in list(self.jobs.values()):
            if entry.done:
                continue
            update = entry.job.poll()
            entry.progress.update_all(update.events)
            entry.log += update.log
            entry.state, entry.message, entry.exit_code = JobState(update.state), update.message, update.exit_code
            updates.append((entry, update))
        return updates

    def wait(self, kind: str, timeout: float, interval: float = 0.5, tick=None) -> ModuleJob:
        """Poll one job until it ends (self-test, scripting); ``tick`` runs between polls
        (Slicer's processEvents keeps the UI alive)."""
        entry = self.jobs[kind]
        deadline = time.monotonic() + timeout
        while not entry.done:
            self.poll()
            if entry.done:
                break
            if time.monotonic() > deadline:
                entry.job.cancel()
                raise TimeoutError(f"{kind} did not finish within {timeout:.0f} s")
            if tick is not None:
                tick()
            time.sleep(interval)
        return entry

    def cancel(self, kind: str) -> None:
        entry = self.jobs.get(kind)
        if entry is not None and not entry.done:
            entry.job.cancel()

    def close_scene(self) -> list[str]:
        """The scene is closing: cancel the jobs that hold its nodes and let go of the nodes."""
        cancelled = []
        for kind, entry in self.jobs.items():
            if entry.context.holds_nodes:
                if not entry.done:
                    entry.job.cancel()
                    entry.cancelled_by_scene_close = True
                    cancelled.append(kind)
                entry.context.release_nodes()
        return cancelled

    def shutdown(self, keep_running: bool = False, grace: float = 5.0) -> None:
        """Slicer is exiting. Local jobs are stopped (their trees would outlive Slicer) unless
        ``keep_running``: then searches and fingerprints go on and a restarted module finds them
        again (:func:`job_record`); a prediction is always stopped (its scene is gone). Remote
        jobs run on on their runner."""
        for entry in self.jobs.values():
            if entry.done:
                continue
            if entry.context.remote:
                entry.job.close()
            elif not (keep_running and entry.kind in REATTACHED_KINDS):
                entry.job.stop(grace=grace)


# -- local jobs -------------------------------------------------------------------------------------


def library_parent() -> Path:
    """The folder holding the ``AutoNNUNetLib`` package (first on the child's PYTHONPATH)."""
    import AutoNNUNetLib

    return Path(AutoNNUNetLib.__file__).resolve().parent.parent


def python_executable() -> str:
    """PythonSlicer (Slicer's Python with its library paths), else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def child_environment(base=None, extra: Optional[dict] = None) -> dict[str, str]:
    """A fresh environment for a child; ``base`` (Slicer's ``os.environ``) is never changed.

    The folder holding ``AutoNNUNetLib`` goes first on PYTHONPATH, so the child imports the same
    library as the module, also from a source checkout.
    """
    env = {str(k): str(v) for k, v in (os.environ if base is None else base).items()}
    parent = str(library_parent())
    paths = [parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != parent]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[str(key)] = str(value)
    return env


def search_root(work_dir) -> Path:
    return Path(work_dir) / "search"


def has_search(work_dir) -> bool:
    root = search_root(work_dir)
    return root.exists() and any(root.iterdir())


def workspace_state(work_dir) -> dict[str, bool]:
    """Which steps the working folder has been through: dataset exported, planned, searched."""
    work_dir = Path(work_dir)
    return {"dataset": any(work_dir.glob("nnUNet_raw/Dataset*/dataset.json")),
            "planned": any(work_dir.glob("nnUNet_preprocessed/Dataset*/nnUNetPlans.json")),
            "search": has_search(work_dir)}


def job_folder(work_dir, kind: str) -> Path:
    """A new folder ``<working folder>/jobs/<kind>-<time>`` (unique within the second)."""
    base = Path(work_dir) / "jobs" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, number = base, 2
    while folder.exists():
        folder = base.with_name(f"{base.name}-{number}")
        number += 1
    folder.mkdir(parents=True)
    return folder


def _start(job_dir: Path, steps: list, python: Optional[str], env: Optional[dict]):
    from AutoNNUNetLib.jobs.local import LocalJob
    from AutoNNUNetLib.jobs.spec import JobSpec

    spec = JobSpec(job_dir=str(job_dir), steps=steps, python=python or python_executable())
    return LocalJob.start(spec, env=env if env is not None else child_environment())


def start_fingerprint(work_dir, *, summary_only: bool = False, python: Optional[str] = None,
                      env: Optional[dict] = None):
    """Fingerprint, plan and preprocess the working folder's dataset (again, after a new export);
    with ``summary_only`` just print the summary of the existing plans (the child imports nnU-Net,
    Slicer does not). The summary is the job's log."""
    from AutoNNUNetLib.jobs.spec import Step

    work_dir = Path(work_dir).resolve()
    job_dir = job_folder(work_dir, "fingerprint")
    argv = ["fingerprint", "--workdir", str(work_dir)]
    if summary_only:
        step = Step(name="summary", argv=[*argv, "--summary-only"], message="summarize the fingerprint and plans")
    else:
        step = Step(name="fingerprint", argv=argv, lock=str(work_dir / ".plan.lock"),
                    message="fingerprint, plan and preprocess the dataset")
    return _start(job_dir, [step], python, env), JobContext("fingerprint", work_dir)


def start_model_export(work_dir, model_dir, zip_path, *, python: Optional[str] = None, env: Optional[dict] = None):
    """Write a model folder as a zip in a child (it loads every checkpoint to check it)."""
    from AutoNNUNetLib.jobs.spec import Step

    work_dir = Path(work_dir).resolve()
    step = Step(name="export-model", builtin="export_model",
                kwargs={"source": str(Path(model_dir).resolve()), "dest": str(Path(zip_path).resolve())},
                message=f"export the model to {zip_path}")
    return _start(job_folder(work_dir, "model"), [step], python, env), JobContext(
        "model", work_dir, output_file=Path(zip_path).resolve())


def start_model_import(work_dir, zip_path, *, dest=None, python: Optional[str] = None, env: Optional[dict] = None):
    """Unpack and check a model zip into ``dest`` (default ``<working folder>/models/<zip name>``)
    in a child: checking loads every checkpoint with torch, which Slicer's process never imports.
    The model folder lands below ``dest`` (see :func:`imported_model_dir`)."""
    from AutoNNUNetLib.jobs.spec import Step

    work_dir = Path(work_dir).resolve()
    dest = Path(dest).resolve() if dest is not None else work_dir / "models" / Path(zip_path).stem
    # --overwrite: importing the same zip again replaces the earlier import.
    step = Step(name="import-model", argv=["import-model", str(Path(zip_path).resolve()), str(dest), "--overwrite"],
                message=f"import the model {Path(zip_path).name}")
    return _start(job_folder(work_dir, "model"), [step], python, env), JobContext("model", work_dir, model_dir=dest)


def start_search(work_dir, settings, *, resume: bool = False, python: Optional[str] = None,
                 env: Optional[dict] = None):
    """A local search: the child reads ``settings`` (the one search record) from a request file.

    A fresh start keeps an earlier search folder, renamed; ``resume`` continues it.
    """
    from AutoNNUNetLib.files import atomic_write_json
    from AutoNNUNetLib.jobs.spec import EVENTS_NAME, Step

    work_dir = Path(work_dir).resolve()
    root = search_root(work_dir)
    if not resume and has_search(work_dir):
        root.rename(root.with_name(f"search-{time.strftime('%Y%m%d-%H%M%S')}"))
    job_dir = job_folder(work_dir, "search")
    request = atomic_write_json(job_dir / "search-request.json", settings.to_dict())
    argv = ["search", "--workdir", str(work_dir), "--root", str(root), "--request", str(request),
            "--events", str(job_dir / EVENTS_NAME), "--quiet"]
    step = Step(name="search", argv=argv, ok_codes=[0, SEARCH_STOPPED_EXIT],
                message=("resume" if resume else "start") + " the search")
    return _start(job_dir, [step], python, env), JobContext("search", work_dir, search_root=root)


def selection_root(work_dir) -> Path:
    """Where a local selection writes nnU-Net's files (it becomes the model folder when it ends)."""
    return Path(work_dir) / "selection"


def start_selection(work_dir, params, *, python: Optional[str] = None, env: Optional[dict] = None):
    """nnU-Net's model selection after the working folder's search (a ``SelectParams``): the
    candidates trained on every fold to ``params.epochs``, then the model or ensemble and its
    postprocessing, into :func:`selection_root`. Starting it again resumes it: finished folds stay."""
    from AutoNNUNetLib.jobs.recipes import prepare_steps, select_steps

    work_dir = Path(work_dir).resolve()
    if not has_search(work_dir):
        raise ValueError(f"{search_root(work_dir)} holds no search yet: run a search first")
    job_dir = job_folder(work_dir, "select")
    # The panel's fingerprint step planned every configuration but preprocessed 3d_fullres only;
    # no plan step here (it would plan again): the other candidates are preprocessed where planned.
    steps = prepare_steps(work_dir, params.configurations, plan=False) + select_steps(
        params, job_dir, work_dir, search_root(work_dir), selection_root(work_dir))
    return _start(job_dir, steps, python, env), JobContext("select", work_dir, search_root=search_root(work_dir),
                                                          model_dir=selection_root(work_dir))


def start_prediction(work_dir, model_dir, inputs: Sequence[Any], *, device: str = "auto", mirroring: bool = False,
                     largest_component: bool = False, python: Optional[str] = None, env: Optional[dict] = None,
                     reference_volume: Any = None, output_segmentation: Any = None, classes: Optional[dict] = None,
                     show_3d: bool = True, folds=None, members: Optional[Sequence[str]] = None,
                     looks: Optional[dict] = None):
    """Segment one case: ``inputs`` are ``imaging.Volume`` channels, written here in nnU-Net naming.
    ``model_dir`` is a model folder or a selection root (then ``members`` picks among its members)."""
    from AutoNNUNetLib.jobs.params import PredictParams
    from AutoNNUNetLib.jobs.spec import EVENTS_NAME, Step

    from .models import is_selection

    work_dir, model_dir = Path(work_dir).resolve(), Path(model_dir).resolve()
    if not (model_dir / "plans.json").is_file() and not is_selection(model_dir):
        raise ValueError(f"{model_dir} is not an nnU-Net model folder (no plans.json) nor a selection (no selection.json)")
    # Validated first: a bad fold or device is refused before anything is written.
    params = PredictParams(mirroring=bool(mirroring), largest_component=bool(largest_component), device=device,
                           folds=folds, members=list(members) if members is not None else None)
    job_dir = job_folder(work_dir, "predict")
    images, output = job_dir / "inputs", job_dir / "output"
    for index, volume in enumerate(inputs):
        volume.write(images / f"case_{index:04d}.nii.gz")
    # --events: the stages and slab progress the Inference status shows (not a lasting "Starting...").
    argv = [*params.to_argv(model_dir, images, output), "--events", str(job_dir / EVENTS_NAME)]
    step = Step(name="predict", argv=argv, message="segment the volume")
    context = JobContext("predict", work_dir, model_dir=model_dir, output_file=output / "case.nii.gz",
                         reference_volume=reference_volume, output_segmentation=output_segmentation,
                         classes=dict(classes or {}), looks=dict(looks or {}), show_3d=show_3d)
    return _start(job_dir, [step], python, env), context


#: What the versions check prints (one line the module finds in the job's log).
VERSIONS_MARK = "AUTONNUNET_VERSIONS "
_VERSIONS_CODE = f"""
import importlib.metadata as metadata, json
found = {{}}
for name in ("torch", "nnunetv2", "neural-pipeline-search"):
    try:
        found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        found[name] = None
try:
    import torch
    found["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    found["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
except Exception as error:
    found["error"] = f"{{type(error).__name__}}: {{error}}"
print({VERSIONS_MARK!r} + json.dumps(found), flush=True)
"""


def start_versions_check(work_dir, *, python: Optional[str] = None, env: Optional[dict] = None):
    """Which torch (and GPU), nnunetv2 and NePS the jobs will use: asked in a child, so Slicer
    never imports torch to find out."""
    from AutoNNUNetLib.jobs.spec import Step

    work_dir = Path(work_dir).resolve()
    python = python or python_executable()
    step = Step(name="versions", command=[python, "-c", _VERSIONS_CODE], message="check the installed versions")
    return _start(job_folder(work_dir, "versions"), [step], python, env), JobContext("versions", work_dir)


def imported_model_dir(dest) -> Optional[Path]:
    """The model folder an import put below ``dest`` (``DatasetNNN_Name/<trainer>__<plans>__<config>``),
    or ``dest`` itself when a selection zip made it a selection root."""
    from AutoNNUNetLib.jobs.builtins import find_model_dir
    from AutoNNUNetLib.jobs.spec import JobError

    from .models import is_selection

    if is_selection(dest):
        return Path(dest)
    try:
        return find_model_dir(dest)
    except JobError:
        return None


# -- remote jobs ------------------------------------------------------------------------------------


def remote_client(url: str, token: str, **options):
    """The HTTP client of a runner (``options``: the client's timeout and retries)."""
    from AutoNNUNetLib.remote.client import RemoteClient

    if not url:
        raise ValueError("enter the runner's URL")
    return RemoteClient(url, token or None, **options)


def start_remote_search(work_dir, settings, url: str, token: str):
    """Upload the exported dataset and submit the search (all network calls off the caller's thread)."""
    from AutoNNUNetLib.remote.job import RemoteJob
    from AutoNNUNetLib.workspace import Workspace

    from .parameters import search_request

    work_dir = Path(work_dir)
    dataset_dir = Workspace(work_dir).raw_dataset  # raises when no dataset was exported
    download_dir = job_folder(work_dir, "remote-search")
    job = RemoteJob.start_search(remote_client(url, token), dataset_dir, search_request(settings),
                                 download_dir=download_dir)
    return job, JobContext("search", work_dir, download_dir=download_dir, remote=True)


def start_remote_selection(work_dir, search_job_id: str, params, url: str, token: str):
    """Submit nnU-Net's model selection on the runner's search job ``search_job_id``; the
    selection zip arrives in the job's download folder (network calls off the caller's thread)."""
    from AutoNNUNetLib.remote.job import RemoteJob

    if not search_job_id:
        raise ValueError("no remote search to select from: run a search on the runner first")
    body = {name: value for name, value in params.to_dict().items() if name != "search_job_id"}
    download_dir = job_folder(Path(work_dir), "remote-select")
    job = RemoteJob.submit(remote_client(url, token), "select", {"search_job_id": search_job_id, **body},
                           download_dir=download_dir)
    return job, JobContext("select", Path(work_dir), download_dir=download_dir, remote=True)


# -- re-attach after Slicer restarts -----------------------------------------------------------------

#: Kinds worth picking up again after a restart (a prediction's input node is gone with the scene).
REATTACHED_KINDS = ("search", "fingerprint", "select")


def job_record(entry: ModuleJob) -> Optional[dict]:
    """What Slicer's settings keep of a running job, to find it again after a restart."""
    if entry.done or entry.kind not in REATTACHED_KINDS:
        return None
    context = entry.context
    record = {"kind": entry.kind, "work_dir": str(context.work_dir)}
    if context.remote:
        record.update(remote=True, job_id=entry.job.job_id, url=str(entry.job.client.server_url),
                      download_dir=str(context.download_dir))
        return record if entry.job.job_id else None  # not submitted yet: nothing to find again
    record.update(remote=False, job_dir=str(entry.job.job_dir))
    return record


def reattach_local(record: dict):
    """``(job, context)`` of a local job recorded by :func:`job_record`, or None when its folder
    is gone. The job's first poll replays its events and log (its progress is complete again)."""
    from AutoNNUNetLib.jobs.local import LocalJob
    from AutoNNUNetLib.jobs.spec import JobError

    try:
        job = LocalJob.open(record["job_dir"])
    except (JobError, KeyError, OSError):
        return None
    work_dir = Path(record["work_dir"])
    kind = record["kind"]
    root = search_root(work_dir) if kind in ("search", "select") else None
    return job, JobContext(kind, work_dir, search_root=root, model_dir=selection_root(work_dir) if kind == "select"
                           else None)


def reattach_remote(record: dict, token: str):
    """``(job, context)`` of a recorded remote job. Calls the server: run it off the UI thread."""
    from AutoNNUNetLib.remote.job import RemoteJob

    download_dir = Path(record["download_dir"])
    job = RemoteJob.attach(remote_client(record["url"], token), record["job_id"], download_dir=download_dir)
    return job, JobContext(record["kind"], Path(record["work_dir"]), download_dir=download_dir, remote=True)


def parse_job_records(text: str) -> list[dict]:
    """The records Slicer's settings keep (anything unreadable is no record)."""
    import json

    try:
        records = json.loads(text or "[]")
    except ValueError:
        return []
    return [r for r in records if isinstance(r, dict) and r.get("kind")] if isinstance(records, list) else []


def reattach_all(board: JobBoard, records: Sequence[dict], token: str, *, background, log) -> None:
    """Add the recorded jobs to ``board`` again: local ones now, from their folder (their first
    poll replays the progress); remote ones through ``background(name, function, on_done)``,
    since finding them calls the server. ``log`` gets one line per job found (or not)."""
    for record in records:
        kind = record["kind"]
        if board.running(kind):
            continue
        if not record.get("remote"):
            found = reattach_local(record)
            if found is not None:
                board.add(kind, *found)
                log(f"Watching the {kind} in {record['job_dir']} again.")
            continue

        def attached(result, kind=kind) -> None:
            if isinstance(result, Exception):
                log(f"Could not find the remote {kind} again: {result}")
            elif not board.running(kind):
                board.add(kind, *result)
                log(f"Watching the remote {kind} {result[0].job_id} again.")

        background("reattach", lambda record=record: reattach_remote(record, token), attached)
