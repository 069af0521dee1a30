"""Recipes: the steps a job of each kind runs, built from its request record.

The server and the Slicer module (local jobs) build their job folders here, so a search, a
training, a prediction or a model selection runs the same command wherever it runs. A recipe returns a
:class:`~.spec.JobSpec`; :func:`start_local` starts it as a :class:`~.local.LocalJob`.

With ``artifacts`` (the server) the recipe adds the steps that collect downloadable files
(model zip, results, trials table, report, predictions zip, selection zip) into that folder.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Optional, Union

from ..files import atomic_write_json
from .local import LocalJob
from .params import Params, PredictParams, RequestError, SearchParams, SelectParams, TrainParams
from .spec import ARTIFACTS_DIR, EVENTS_NAME, MODEL_DIR_PREFIX, JobSpec, Step

PathLike = Union[str, Path]
#: ``autonnunet search`` exits with 3 when a budget (such as the wall-clock limit) stopped it: a success.
SEARCH_BUDGET_EXIT = 3


def plan_step(workspace: PathLike) -> Step:
    """Fingerprint, plan and preprocess a workspace once (shared by every job on it).

    A lock so two jobs don't plan at once, a marker so it runs once (also across restarts).
    """
    workspace = Path(workspace)
    return Step(name="plan", argv=["fingerprint", "--workdir", str(workspace)],
                lock=str(workspace / ".plan.lock"), done_marker=str(workspace / ".planned"),
                message="fingerprint, plan and preprocess the dataset")


def preprocess_step(workspace: PathLike, configurations: list[str]) -> Step:
    """Preprocess those of ``configurations`` the shared plan step did not (it does 3d_fullres).

    After :func:`plan_step`, under its lock; no marker, since each job asks for its own
    configurations and the command costs nothing when they are all there. It never re-plans, and
    leaves an unplanned configuration to the job (a search names it, a selection skips it).
    """
    workspace = Path(workspace)
    return Step(name="preprocess", argv=["fingerprint", "--workdir", str(workspace), "--configurations",
                                         *configurations, "--missing-only"],
                lock=str(workspace / ".plan.lock"),
                message=f"preprocess {', '.join(configurations)} where nnU-Net planned them")


def prepare_steps(workspace: PathLike, configurations: list[str], plan: bool = True) -> list[Step]:
    """The plan step (not with ``plan=False``: a workspace planned by other means), then a
    preprocess step when a job needs more than the planned default."""
    extra = [name for name in configurations if name != "3d_fullres"]
    return ([plan_step(workspace)] if plan else []) + ([preprocess_step(workspace, extra)] if extra else [])


def search_steps(params: SearchParams, job_dir: PathLike, workspace: PathLike, root: PathLike, *,
                 device: str = "auto", env: Optional[dict[str, str]] = None,
                 extra_argv: Optional[list[str]] = None, artifacts: Optional[PathLike] = None) -> list[Step]:
    """A PriorBand search of ``workspace`` into ``root``; events go to the job folder's file."""
    job_dir, root = Path(job_dir), Path(root)
    argv = params.to_argv(workspace, root, device=device, events=str(job_dir / EVENTS_NAME)) + ["--quiet"]
    workers = params.settings().workers
    steps = [Step(name="search", argv=argv + list(extra_argv or []), env=dict(env or {}),
                  ok_codes=[0, SEARCH_BUDGET_EXIT], message=f"PriorBand search with {workers} worker(s)")]
    if artifacts is None:
        return steps
    artifacts = Path(artifacts)
    steps += [
        Step(name="export", builtin="export_model",
             kwargs={"source": str(root / "incumbent"), "dest": str(artifacts / "model.zip")},
             message="export the incumbent model"),
        Step(name="results", builtin="copy",
             kwargs={"source": str(root / "results.json"), "dest": str(artifacts / "results.json"),
                     "missing_ok": True}),
        Step(name="trials", builtin="trials_table", optional=True,
             kwargs={"results": str(root / "results.json"), "dest": str(artifacts / "trials.csv")}),
    ]
    if importlib.util.find_spec("AutoNNUNetLib.search.report") is not None:
        steps += [
            Step(name="report", argv=["report", str(root), "--out", str(job_dir / "report")],
                 optional=True, message="write the search report"),
            Step(name="report-zip", builtin="zip_folder", optional=True,
                 kwargs={"source": str(job_dir / "report"), "dest": str(artifacts / "report.zip")}),
        ]
    return steps


def train_steps(params: TrainParams, job_dir: PathLike, workspace: PathLike, output: PathLike, *,
                device: Optional[str] = None, workers: Optional[list[dict[str, str]]] = None,
                artifacts: Optional[PathLike] = None) -> list[Step]:
    """One training into the model folder ``output``; the configuration travels as a file."""
    job_dir, output = Path(job_dir), Path(output)
    config_file = None
    if params.config is not None:
        config_file = atomic_write_json(job_dir / "config.json", params.config)
    argv = params.to_argv(workspace, output, config_file) + ["--events", str(job_dir / EVENTS_NAME)]
    if device is not None:
        argv += ["--device", device]
    steps = [Step(name="train", argv=argv, workers=workers, remote=True, message="train nnU-Net")]
    if artifacts is not None:
        artifacts = Path(artifacts)
        steps += [
            Step(name="export", builtin="export_model",
                 kwargs={"source": str(output), "dest": str(artifacts / "model.zip")}),
            Step(name="record", builtin="copy",
                 kwargs={"source": str(output / "autonnunet.json"), "dest": str(artifacts / "record.json"),
                         "missing_ok": True}),
        ]
    return steps


def predict_steps(params: PredictParams, job_dir: PathLike, model: PathLike, images: PathLike,
                  output: PathLike, *, device: Optional[str] = None,
                  workers: Optional[list[dict[str, str]]] = None, artifacts: Optional[PathLike] = None) -> list[Step]:
    """Segment ``images`` (a file or a folder) into ``output`` with ``model``: a model folder, or a
    model zip, which is imported into the job folder first."""
    job_dir, model = Path(job_dir), Path(model)
    steps: list[Step] = []
    if model.suffix.lower() == ".zip":
        model_dir = job_dir / "model"
        steps.append(Step(name="model", builtin="import_model", kwargs={"source": str(model), "dest": str(model_dir)},
                          done_marker=str(job_dir / ".model-imported"), message="import the model"))
        model_arg = MODEL_DIR_PREFIX + str(model_dir)
    else:
        model_arg = str(model)
    argv = params.to_argv(model_arg, images, output) + ["--events", str(job_dir / EVENTS_NAME)]
    if device is not None:
        argv += ["--device", device]
    steps.append(Step(name="predict", argv=argv, workers=workers, remote=True, message="segment the images"))
    if artifacts is not None:
        steps.append(Step(name="collect", builtin="zip_folder",
                          kwargs={"source": str(output), "dest": str(Path(artifacts) / "predictions.zip")}))
    return steps


def select_steps(params: SelectParams, job_dir: PathLike, workspace: PathLike, search: PathLike, output: PathLike, *,
                 device: Optional[str] = None, workers: Optional[list[dict[str, str]]] = None,
                 artifacts: Optional[PathLike] = None) -> list[Step]:
    """nnU-Net's selection on the search at ``search``: finalize into the selection root
    ``output`` (a re-run trains only the folds that are missing), then select."""
    job_dir, output = Path(job_dir), Path(output)
    argv = params.to_argv(workspace, search, output) + ["--events", str(job_dir / EVENTS_NAME)]
    if device is not None:
        argv += ["--device", device]
    steps = [Step(name="finalize", argv=argv, workers=workers, remote=True,
                  message="train the candidates on every fold"),
             Step(name="select", argv=params.select_argv(output), remote=True,
                  message="choose the model or ensemble and its postprocessing")]
    if artifacts is not None:
        artifacts = Path(artifacts)
        steps += [
            Step(name="export", argv=["export-model", str(output), str(artifacts / "selection.zip")],
                 message="export the selection"),
            Step(name="record", builtin="copy",
                 kwargs={"source": str(output / "selection.json"), "dest": str(artifacts / "selection.json")}),
        ]
        if importlib.util.find_spec("AutoNNUNetLib.search.report") is not None:
            steps += [
                Step(name="report", argv=["report", str(search), "--selection", str(output),
                                          "--out", str(job_dir / "report")],
                     optional=True, message="write the report with the selection"),
                Step(name="report-zip", builtin="zip_folder", optional=True,
                     kwargs={"source": str(job_dir / "report"), "dest": str(artifacts / "report.zip")}),
            ]
    return steps


def local_spec(params: Params, job_dir: PathLike, *, workspace: Optional[PathLike] = None,
               root: Optional[PathLike] = None, output: Optional[PathLike] = None, model: Optional[PathLike] = None,
               images: Optional[PathLike] = None, plan: bool = False, python: Optional[str] = None,
               env: Optional[dict[str, str]] = None) -> JobSpec:
    """The job folder of a local run of ``params`` (what the Slicer module starts).

    search: ``workspace`` and ``root``; train: ``workspace`` and ``output``; predict: ``model``,
    ``images`` and ``output``; select: ``workspace``, ``root`` (the search root) and ``output``
    (the selection root). ``plan`` first fingerprints/plans the workspace (once).
    """
    job_dir = Path(job_dir).resolve()
    job_dir.mkdir(parents=True, exist_ok=True)

    def need(name: str, value: Optional[PathLike]) -> Path:
        if value is None:
            raise RequestError(f"a local {type(params).__name__} job needs {name}")
        return Path(value).resolve()

    steps: list[Step] = []
    if isinstance(params, SearchParams):
        ws = need("workspace", workspace)
        steps = ((prepare_steps(ws, params.settings().configurations) if plan else [])
                 + search_steps(params, job_dir, ws, need("root", root)))
    elif isinstance(params, TrainParams):
        ws = need("workspace", workspace)
        steps = ([plan_step(ws)] if plan else []) + train_steps(params, job_dir, ws, need("output", output))
    elif isinstance(params, PredictParams):
        steps = predict_steps(params, job_dir, need("model", model), need("images", images), need("output", output))
    elif isinstance(params, SelectParams):
        ws = need("workspace", workspace)
        steps = ((prepare_steps(ws, params.configurations) if plan else [])
                 + select_steps(params, job_dir, ws, need("root", root), need("output", output)))
    else:
        raise RequestError(f"not a job request: {type(params).__name__}")
    atomic_write_json(job_dir / "request.json", {"kind": type(params).__name__, "params": params.to_dict()})
    return JobSpec(job_dir=str(job_dir), steps=steps, python=python or sys.executable, env=dict(env or {}))


def start_local(params: Params, job_dir: PathLike, *, env: Optional[dict[str, str]] = None, **paths) -> LocalJob:
    """Build the job folder of ``params`` (see :func:`local_spec`) and start it."""
    return LocalJob.start(local_spec(params, job_dir, **paths), env=env)


__all__ = ["ARTIFACTS_DIR", "plan_step", "preprocess_step", "prepare_steps", "search_steps", "train_steps",
           "predict_steps", "select_steps", "local_spec", "start_local"]
