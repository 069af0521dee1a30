"""Request records: what a user may ask of each job kind, validated once, at creation.

The same records validate the server's JSON (FastAPI/pydantic read stdlib dataclasses;
``__pydantic_config__`` forbids unknown keys, so a typo is an error and not a silently ignored
setting, and is strict, so ``true`` is not taken for 1), the Slicer module's requests and the
CLI's flags, and build the command line of the job's step. A value that cannot run (a seed of
2**32, 10**30 epochs, ``true`` for a count, inf or NaN, an unknown device) is refused in
``__post_init__`` with a :class:`RequestError` naming the field, never queued to fail later.

The search kind holds no defaults of its own: :class:`SearchParams` is the subset of
:class:`~AutoNNUNetLib.search.settings.SearchSettings` a job submitter may set (not where the
search writes its files or which launcher it uses: the job decides those), and builds the one
search record from it.

Standard library only (plus the search record, which imports neither NePS nor torch).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from ..config import ConfigError, configuration_names
from ..devices import check_device_name
from ..errors import AutoNNUNetError, UserInputError
from ..folds import parse_folds
from ..search.settings import SEED_LIMIT, SearchSettings

JOB_KINDS: tuple[str, ...] = ("search", "train", "predict", "select")
EXECUTORS: tuple[str, ...] = ("local", "slurm", "submitit-local")

#: Upper limits: far above any real training, low enough that a typo (or 10**30) is caught at once.
MAX_EPOCHS = 100_000
MAX_ITERATIONS = 1_000_000
#: Pareto points besides the incumbent a selection may finalize: each costs a 5-fold training, and
#: the pairwise ensembles grow with the square of the candidates.
MAX_TOP = 20
PYDANTIC_CONFIG = {"extra": "forbid", "strict": True}

FoldsField = Union[Literal["all"], list[int]]


class RequestError(UserInputError):
    """A job request holds a value that cannot run (names the field and the rule)."""


def _integer(name: str, value: Any, low: int, high: int, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name}: expected a whole number, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"{name}: must be between {low} and {high}, got {value}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise RequestError(f"{name}: expected true or false, got {value!r}")


def _folds(value: Any) -> list[int]:
    if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
        raise RequestError(f"folds: expected fold numbers 0-4 or 'all', got {value!r}")
    if isinstance(value, list) and not all(isinstance(v, int) for v in value):
        raise RequestError(f"folds: expected fold numbers 0-4 or 'all', got {value!r}")
    try:
        return parse_folds(value)
    except AutoNNUNetError as error:
        raise RequestError(f"folds: {error}") from None


def _folds_argv(folds: FoldsField) -> list[str]:
    return ["all"] if folds == "all" else [str(f) for f in folds]


def _check_text(name: str, value: Any, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise RequestError(f"{name}: expected text, got {value!r}")


class _Record:
    """JSON helpers shared by the request records (dataclasses)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any):
        if not isinstance(data, dict):
            raise RequestError(f"a {cls.__name__} must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise RequestError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as error:  # a required field is missing
            raise RequestError(f"{cls.__name__}: {error}") from None

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except ValueError as error:
            raise RequestError(f"the {cls.__name__} is not valid JSON: {error}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: Union[str, Path]):
        """Read a request file (``--request FILE``)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise RequestError(f"cannot read the request {path}: {error.strerror or error}") from None
        return cls.from_json(text)


#: Fields of the search record a job submitter may set; None leaves the record's own default.
SEARCH_REQUEST_FIELDS = (
    "space", "profile", "min_epochs", "max_epochs", "eta", "budget", "total_epochs", "max_trials", "wall_time",
    "folds", "iterations_per_epoch", "runtime_weight", "seed", "workers", "optimizer", "prior_confidence",
    "max_validation_cases", "configuration", "configurations",
)


@dataclass
class SearchParams(_Record):
    """A PriorBand search (``autonnunet search``) on an uploaded dataset: the part of
    :class:`~AutoNNUNetLib.search.settings.SearchSettings` a submitter sets. Unset fields
    (None) take the search record's defaults; validation is the search record's."""

    __pydantic_config__ = PYDANTIC_CONFIG

    upload_id: str = ""
    space: Optional[str] = None
    profile: Optional[str] = None
    min_epochs: Optional[int] = None
    max_epochs: Optional[int] = None
    eta: Optional[int] = None
    budget: Optional[float] = None
    total_epochs: Optional[int] = None
    max_trials: Optional[int] = None
    wall_time: Optional[float] = None
    folds: Optional[FoldsField] = None
    iterations_per_epoch: Optional[int] = None
    runtime_weight: Optional[float] = None
    seed: Optional[int] = None
    workers: Optional[int] = None  # parallel NePS workers; each takes one GPU (or one CPU slot)
    optimizer: Optional[str] = None
    prior_confidence: Optional[str] = None
    max_validation_cases: Optional[int] = None
    configuration: Optional[str] = None         # the prior's nnU-Net configuration (None: 3d_fullres)
    configurations: Optional[list[str]] = None  # the searched ones (None: [configuration])

    def __post_init__(self) -> None:
        _check_text("upload_id", self.upload_id, optional=False)
        self.settings()  # the search record's checks, once, now

    def settings(self, **job_fields: Any) -> SearchSettings:
        """The one search record for this request; ``job_fields`` are the job's own choices
        (device, launcher, gpus, events), which a submitter cannot set."""
        given = {name: getattr(self, name) for name in SEARCH_REQUEST_FIELDS if getattr(self, name) is not None}
        try:
            return SearchSettings(upload_id=self.upload_id or None, **given, **job_fields)
        except AutoNNUNetError as error:
            raise RequestError(str(error)) from None

    def to_argv(self, workdir: Union[str, Path], root: Union[str, Path], **job_fields: Any) -> list[str]:
        """Arguments of ``autonnunet search`` for this request (workspace and root are the job's)."""
        return ["search", "--workdir", str(workdir), "--root", str(root), *self.settings(**job_fields).to_argv()]


@dataclass
class TrainParams(_Record):
    """One nnU-Net training (``autonnunet train``) of a configuration."""

    __pydantic_config__ = PYDANTIC_CONFIG

    upload_id: str = ""
    epochs: int = 100
    config: Optional[dict[str, Any]] = None  # TrialConfig fields; None = nnU-Net default
    folds: FoldsField = field(default_factory=lambda: [0])
    max_epochs: Optional[int] = None
    iterations_per_epoch: Optional[int] = None
    seed: Optional[int] = None
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_text("upload_id", self.upload_id, optional=False)
        _integer("epochs", self.epochs, 1, MAX_EPOCHS, optional=False)
        _integer("max_epochs", self.max_epochs, 1, MAX_EPOCHS)
        _integer("iterations_per_epoch", self.iterations_per_epoch, 1, MAX_ITERATIONS)
        _integer("seed", self.seed, 0, SEED_LIMIT - 1)
        if self.max_epochs is not None and self.max_epochs < self.epochs:
            raise RequestError(f"max_epochs: must be at least epochs ({self.epochs}), got {self.max_epochs}")
        if self.folds != "all":
            self.folds = _folds(self.folds)
        self.device = _device(self.device)
        if self.config is not None:  # refuse a bad configuration now, not after queueing and planning
            from ..config import TrialConfig

            if not isinstance(self.config, dict):
                raise RequestError(f"config: expected an object of configuration fields, got {self.config!r}")
            try:
                TrialConfig.from_dict(self.config).validate()
            except (TypeError, ValueError) as error:
                raise RequestError(f"config: {error}") from None

    def to_argv(self, workdir: Union[str, Path], output: Union[str, Path],
                config_file: Optional[Union[str, Path]] = None) -> list[str]:
        argv = ["train", "--workdir", str(workdir), "--epochs", str(self.epochs), "--output", str(output),
                "--folds", *_folds_argv(self.folds)]
        if config_file is not None:
            argv += ["--config", str(config_file)]
        for name in ("max_epochs", "iterations_per_epoch", "seed"):
            value = getattr(self, name)
            if value is not None:
                argv += ["--" + name.replace("_", "-"), str(value)]
        if self.device != "auto":
            argv += ["--device", self.device]
        return argv


@dataclass
class PredictParams(_Record):
    """Segment images (``autonnunet predict``) with a model from a job or an upload (remote), or
    with a model folder given to the recipe (local)."""

    __pydantic_config__ = PYDANTIC_CONFIG

    images_upload_id: str = ""
    model_job_id: Optional[str] = None     # a finished search/train/select job of the same user
    model_upload_id: Optional[str] = None  # or an uploaded model zip
    mirroring: bool = False
    largest_component: bool = False
    device: str = "auto"
    folds: Optional[FoldsField] = None     # None: every fold the model has
    max_memory_gb: Optional[float] = None  # the bounded prediction's budget (None: slabs of ~512 MB)
    members: Optional[list[str]] = None    # a selection's ensemble members to use (None: all)

    def __post_init__(self) -> None:
        _check_text("images_upload_id", self.images_upload_id, optional=False)
        _check_text("model_job_id", self.model_job_id)
        _check_text("model_upload_id", self.model_upload_id)
        if self.images_upload_id and (self.model_job_id is None) == (self.model_upload_id is None):
            raise RequestError("give exactly one of model_job_id and model_upload_id")
        _flag("mirroring", self.mirroring)
        _flag("largest_component", self.largest_component)
        self.device = _device(self.device)
        if self.folds is not None and self.folds != "all":
            self.folds = _folds(self.folds)
        if self.members is not None:
            if (not isinstance(self.members, list) or not self.members
                    or not all(isinstance(m, str) and m.strip() for m in self.members)):
                raise RequestError(f"members: expected a non-empty list of member names, got {self.members!r}")
            self.members = list(dict.fromkeys(self.members))
        if self.max_memory_gb is not None:
            from ..bounded.budget import check_budget_value

            try:
                check_budget_value(self.max_memory_gb)
            except AutoNNUNetError as error:
                raise RequestError(str(error)) from None

    @property
    def remote(self) -> bool:
        """Whether this request names server uploads (else the recipe gets local paths)."""
        return bool(self.images_upload_id)

    def to_argv(self, model_dir: Union[str, Path], images: Union[str, Path], output: Union[str, Path]) -> list[str]:
        argv = ["predict", "--model", str(model_dir), "-i", str(images), "-o", str(output)]
        if self.mirroring:
            argv.append("--mirroring")
        if self.largest_component:
            argv.append("--largest-component")
        if self.device != "auto":
            argv += ["--device", self.device]
        if self.folds is not None:
            argv += ["--folds", *_folds_argv(self.folds)]
        if self.max_memory_gb is not None:
            argv += ["--max-memory", repr(float(self.max_memory_gb))]
        if self.members is not None:
            argv += ["--members", *self.members]
        return argv


@dataclass
class SelectParams(_Record):
    """nnU-Net's model selection after a search: ``autonnunet finalize`` (the search's candidates
    trained on every fold to ``epochs``, resumable) then ``autonnunet select`` (cross-validation
    Dice of each candidate and pairwise ensemble, postprocessing, nnU-Net's files).

    ``search_job_id`` names a succeeded search job of the same user (server); without it the
    recipe is given the workspace and search root (local). Unset values take finalize's defaults.
    """

    __pydantic_config__ = PYDANTIC_CONFIG

    search_job_id: Optional[str] = None
    epochs: int = 1000                     # the final training length F (nnU-Net's default)
    iterations_per_epoch: Optional[int] = None
    top: int = 1                           # next best Pareto points besides the incumbent
    configurations: list[str] = field(default_factory=lambda: ["2d", "3d_lowres"])  # [] = none
    folds: FoldsField = "all"
    seed: Optional[int] = None
    device: str = "auto"
    tta: bool = False                      # mirroring for the cross-validation and the selection
    ensembles: bool = True                 # False: single models only

    def __post_init__(self) -> None:
        from ..selection.candidates import OTHER_CONFIGURATIONS

        _check_text("search_job_id", self.search_job_id)
        if self.search_job_id is not None and not self.search_job_id:
            raise RequestError("search_job_id: give the id of a succeeded search job (or leave it out)")
        _integer("epochs", self.epochs, 1, MAX_EPOCHS, optional=False)
        _integer("iterations_per_epoch", self.iterations_per_epoch, 1, MAX_ITERATIONS)
        _integer("top", self.top, 0, MAX_TOP, optional=False)
        _integer("seed", self.seed, 0, SEED_LIMIT - 1)
        try:
            self.configurations = configuration_names(self.configurations, OTHER_CONFIGURATIONS)
        except ConfigError as error:
            raise RequestError(f"{error} (3d_fullres is always a candidate)") from None
        if self.folds != "all":
            self.folds = _folds(self.folds)
        self.device = _device(self.device)
        _flag("tta", self.tta)
        _flag("ensembles", self.ensembles)

    @property
    def remote(self) -> bool:
        """Whether this request names a server search job (else the recipe gets local paths)."""
        return self.search_job_id is not None

    def to_argv(self, workdir: Union[str, Path], search: Union[str, Path], output: Union[str, Path]) -> list[str]:
        """Arguments of ``autonnunet finalize`` for this request (workspace, search and selection
        root are the job's). ``--no-ensembles`` travels along for ``finalize --select``."""
        argv = ["finalize", "--workdir", str(workdir), "--search", str(search), "--output", str(output),
                "--epochs", str(self.epochs), "--top", str(self.top),
                "--configurations", *(self.configurations or ["none"]), "--folds", *_folds_argv(self.folds)]
        for name in ("iterations_per_epoch", "seed"):
            value = getattr(self, name)
            if value is not None:
                argv += ["--" + name.replace("_", "-"), str(value)]
        if self.device != "auto":
            argv += ["--device", self.device]
        if self.tta:
            argv.append("--tta")
        if not self.ensembles:
            argv.append("--no-ensembles")
        return argv

    def select_argv(self, output: Union[str, Path]) -> list[str]:
        """Arguments of ``autonnunet select`` on the finalized root."""
        return ["select", str(output), *([] if self.ensembles else ["--no-ensembles"])]

    @classmethod
    def from_args(cls, args: Any) -> "SelectParams":
        """The request of ``autonnunet finalize``'s flags, validated like a server request."""
        all_folds = [str(f).lower() for f in args.folds] == ["all"]
        try:
            folds: FoldsField = "all" if all_folds else parse_folds(args.folds)
        except AutoNNUNetError as error:
            raise RequestError(f"folds: {error}") from None
        values = {"epochs": args.epochs, "top": args.top,
                  "configurations": [] if args.configurations == ["none"] else list(args.configurations),
                  "folds": folds,
                  "device": args.device, "tta": bool(args.tta), "ensembles": not getattr(args, "no_ensembles", False)}
        for name in ("iterations_per_epoch", "seed"):
            if getattr(args, name) is not None:
                values[name] = getattr(args, name)
        return cls.from_dict(values)


def _device(value: Any) -> str:
    if not isinstance(value, str):
        raise RequestError(f"device: expected text such as auto, cpu or cuda:0, got {value!r}")
    try:
        return check_device_name(value)
    except AutoNNUNetError as error:
        raise RequestError(f"device: {error}") from None


PARAMS_TYPES: dict[str, type] = {"search": SearchParams, "train": TrainParams, "predict": PredictParams,
                                  "select": SelectParams}
Params = Union[SearchParams, TrainParams, PredictParams, SelectParams]


def params_from_dict(kind: str, data: dict[str, Any]) -> Params:
    """Rebuild validated parameters from their JSON form (unknown keys are an error)."""
    if kind not in PARAMS_TYPES:
        raise RequestError(f"unknown job kind {kind!r}; expected one of {', '.join(JOB_KINDS)}")
    return PARAMS_TYPES[kind].from_dict(data)


def kind_of(params: Params) -> str:
    for kind, cls in PARAMS_TYPES.items():
        if isinstance(params, cls):
            return kind
    raise RequestError(f"not a job request: {type(params).__name__}")
