"""Jobs: the one way long work (search, train, predict, select) runs, locally or on the job server.

- :mod:`.job`: the :class:`Job` protocol and :class:`JobUpdate` (LocalJob and RemoteJob follow it);
- :mod:`.params`: one request record per job kind (:class:`SearchParams`, :class:`TrainParams`,
  :class:`PredictParams`, :class:`SelectParams`), validated at creation, to and from JSON and argv;
- :mod:`.spec`: a job folder's files (:class:`JobSpec` of :class:`Step` s, :class:`JobExit`);
- :mod:`.recipes`: the steps of each job kind, built from its request record;
- :mod:`.local`: :class:`LocalJob`, a supervisor process group on this machine (re-attaches);
- :mod:`.supervisor`: ``python -m AutoNNUNetLib.jobs supervise JOB_DIR``, runs the steps;
- :mod:`.builtins`: small file steps the supervisor does itself.

A job's progress is the one fold of its events, :class:`AutoNNUNetLib.progress.SearchProgress`
(``Progress`` here) kept by a :class:`AutoNNUNetLib.progress.ProgressReader` (``ProgressTracker``).

Names are loaded on first use, so ``import AutoNNUNetLib.jobs`` stays light for the supervisor
and the Slicer module.
"""

from __future__ import annotations

from ..lazy import lazy_exports

from ..files import sha256_file  # noqa: F401  (re-exported: callers imported it from here)

_EXPORTS = {
    "job": ("Job", "JobUpdate"),
    "spec": ("SPEC_NAME", "LOG_NAME", "EVENTS_NAME", "EXIT_NAME", "PID_NAME", "CANCEL_NAME", "ARTIFACTS_DIR",
             "MODEL_DIR_PREFIX", "JobError", "Step", "SlurmOptions", "JobSpec", "JobExit", "read_exit",
             "write_exit", "read_log"),
    "params": ("JOB_KINDS", "EXECUTORS", "RequestError", "SearchParams", "TrainParams", "PredictParams", "SelectParams",
               "PARAMS_TYPES", "Params", "params_from_dict", "kind_of"),
    "local": ("LocalJob",),
    "supervisor": ("Supervisor", "run_worker", "main"),
    "builtins": ("BUILTINS", "find_model_dir"),
    "recipes": ("plan_step", "preprocess_step", "prepare_steps", "search_steps", "train_steps", "predict_steps",
                "select_steps", "local_spec", "start_local"),
}
#: Older names of the progress fold, which lives in AutoNNUNetLib.progress.
_ALIASES = {"Progress": ("..progress", "SearchProgress"), "ProgressTracker": ("..progress", "ProgressReader")}
_WHERE = {name: (f".{module}", name) for module, names in _EXPORTS.items() for name in names}
_WHERE.update(_ALIASES)

__all__ = ["sha256_file", *_WHERE]

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
