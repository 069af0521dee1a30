"""The one search request record: what the Slicer module, the server, the client and the CLI send.

:class:`SearchSettings` is validated once, at creation (``__post_init__``): a value that would
fail in a worker after the dataset was planned (``runtime_weight=inf``, ``epochs=10**30``, an
unknown space or device, ``True`` where a count is due) is refused here with a
:class:`SearchError` that names the field. It travels as JSON (:meth:`SearchSettings.to_dict` /
:meth:`SearchSettings.from_dict`, ``autonnunet search --request FILE``) or as the flags of
``autonnunet search`` (:meth:`SearchSettings.to_argv` / :meth:`SearchSettings.from_argv`); both
round-trip exactly. Defaults live here and nowhere else.

No NePS or torch import: the server validates requests without loading either.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..config import CONFIGURATIONS, ConfigError, configuration_names
from ..devices import check_device_name
from ..errors import AutoNNUNetError
from ..folds import parse_folds


class SearchError(AutoNNUNetError, ValueError):
    """The search cannot start or continue as requested (names the setting at fault)."""


SPACE_NAMES = ("hpo", "hpo_nas", "hpo_hnas")
OPTIMIZER_NAMES = ("priorband", "random")
LAUNCHERS = ("inline", "process", "submitit")
EXECUTORS = ("local", "slurm")
CONFIDENCES = ("low", "medium", "high")

#: Budget-independent defaults per profile. "quick" is for CPUs and tests: tiny epochs (a few
#: iterations each), a 1..9 epoch fidelity and validation on a few cases. A field left at None
#: takes its profile's value when the record is created.
PROFILES: dict[str, dict[str, Any]] = {
    "default": {"min_epochs": 10, "max_epochs": 1000, "eta": 3, "iterations_per_epoch": 250,
                "max_validation_cases": None},
    "quick": {"min_epochs": 1, "max_epochs": 9, "eta": 3, "iterations_per_epoch": 3,
              "max_validation_cases": 4},
}

#: Settings that define *what* is searched; a resumed search must keep them.
IDENTITY_FIELDS = (
    "space", "min_epochs", "max_epochs", "eta", "prior_confidence", "prior_first", "folds",
    "iterations_per_epoch", "max_validation_cases", "runtime_weight", "optimizer", "configuration", "seed",
    "portfolio", "configurations",
)

#: Upper limits: far above any real search, low enough that a typo (or 10**30) is caught at once.
MAX_EPOCHS_LIMIT = 100_000
MAX_ITERATIONS_LIMIT = 1_000_000
MAX_TOTAL_EPOCHS = 100_000_000
MAX_TRIALS_LIMIT = 1_000_000
MAX_WORKERS = 1024
MAX_BUDGET_F = 1000.0  # in units of one default training
MAX_SECONDS = 10 * 365 * 86400.0
SEED_LIMIT = 2 ** 32  # numpy's seeds are 32-bit


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SearchSettings:
    """Everything a search needs besides the workspace and its root. Stored as ``ROOT/search.json``.

    Budgets (any combination; the first one reached stops the search): ``budget`` is a multiple of
    one default training of ``max_epochs`` on the chosen folds (final model included; see
    :mod:`AutoNNUNetLib.search.budget`); ``total_epochs`` counts epochs actually trained (a
    promotion from 3 to 9 epochs costs 6; each epoch counts once however many folds it trains);
    ``max_trials`` counts trials (NePS evaluations, failed ones included); ``wall_time`` is seconds
    per run. Without any budget the reference's 22 full trainings (``total_epochs = 22 *
    max_epochs``) apply.
    """

    space: str = "hpo"
    #: Which defaults fill the fields below left at None ("default" for GPUs, "quick" for CPUs/tests).
    profile: str = "default"
    min_epochs: Optional[int] = None
    #: F: the final training length; the incumbent is always trained to it.
    max_epochs: Optional[int] = None
    eta: Optional[int] = None
    prior_confidence: str = "medium"
    #: Train nnU-Net's default configuration to F before anything else (the reference does; it is
    #: also the default's Dice at F the final model is compared with). None: on with a ``budget``.
    prior_first: Optional[bool] = None
    folds: list[int] = field(default_factory=lambda: [0])
    iterations_per_epoch: Optional[int] = None
    max_validation_cases: Optional[int] = None
    #: 0 = plain PriorBand; > 0 = Regularized PriorBand (see AutoNNUNetLib.search.priorband).
    runtime_weight: float = 1.0
    #: "priorband" (multi-fidelity) or "random" (random search at full fidelity, a baseline).
    optimizer: str = "priorband"
    #: nnU-Net's configuration of the prior (nnU-Net's default: 3d_fullres); the only one trained
    #: unless ``configurations`` names more.
    configuration: str = "3d_fullres"
    #: The configurations the search chooses among (a categorical hyperparameter with prior
    #: ``configuration``), each of which the dataset's plans must hold. None: ``[configuration]``.
    configurations: Optional[list[str]] = None
    seed: Optional[int] = None
    #: Warm start from the reference's published incumbents (other datasets only). None: on when
    #: a ``budget`` is given, off otherwise.
    portfolio: Optional[bool] = None
    #: The whole run's cost in units of F (one default training of max_epochs on ``folds``).
    budget: Optional[float] = None
    total_epochs: Optional[int] = None
    max_trials: Optional[int] = None
    wall_time: Optional[float] = None
    #: After the search: train incumbent and default to F on this fold (not one of ``folds``)...
    confirm_fold: Optional[int] = None
    #: ... with this many seeds each, and report mean and spread.
    confirm_seeds: int = 2
    workers: int = 1
    #: "inline" (this process; only with 1 worker), "process" or "submitit".
    launcher: str = "inline"
    #: submitit executor: "local" or "slurm".
    executor: str = "local"
    slurm: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    #: GPU ids (CUDA_VISIBLE_DEVICES entries) to spread workers over; None: the visible ones.
    gpus: Optional[list[str]] = None
    #: A trial is retried this many times after its worker died, then recorded failed.
    retries: int = 1
    #: A trial whose heartbeat is older than this (seconds) is considered abandoned.
    stale_after: float = 900.0
    #: Extra events file (besides ROOT/events.jsonl).
    events: Optional[str] = None
    #: Retrain the incumbent at max_epochs on these folds when the search ends (None: no).
    final_folds: Optional[list[int]] = None
    #: The server's dataset upload this search runs on (remote jobs; a local search ignores it).
    upload_id: Optional[str] = None

    # -- creation and validation ----------------------------------------------------------------

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise SearchError(f"profile: unknown profile {self.profile!r}; expected one of {', '.join(PROFILES)}")
        for name, value in PROFILES[self.profile].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self._check_choices()
        self._check_integers()
        self._check_numbers()
        self._check_folds()
        # Switched on by a budget in F (the product's promise), off otherwise; either can be forced.
        if self.portfolio is None:
            self.portfolio = self.budget is not None
        if self.prior_first is None:
            self.prior_first = self.budget is not None

    def _check_choices(self) -> None:
        choices = {"space": SPACE_NAMES, "optimizer": OPTIMIZER_NAMES, "launcher": LAUNCHERS,
                   "executor": EXECUTORS, "prior_confidence": CONFIDENCES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SearchError(f"{name}: unknown value {getattr(self, name)!r}; expected one of {', '.join(allowed)}")
        try:
            self.device = check_device_name(self.device)
        except AutoNNUNetError as error:
            raise SearchError(f"device: {error}") from None
        for name in ("prior_first", "portfolio"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise SearchError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        self._check_configurations()
        if not isinstance(self.slurm, dict):
            raise SearchError(f"slurm: expected a mapping of submitit parameters, got {self.slurm!r}")
        for name in ("events", "upload_id"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise SearchError(f"{name}: expected text, got {getattr(self, name)!r}")
        if self.gpus is not None:
            if isinstance(self.gpus, (str, int)) or any(isinstance(g, bool) for g in self.gpus):
                raise SearchError(f"gpus: expected a list of GPU ids, got {self.gpus!r}")
            self.gpus = [str(g).strip() for g in self.gpus]

    def _check_configurations(self) -> None:
        if self.configuration not in CONFIGURATIONS:
            raise SearchError(f"configuration: unknown nnU-Net configuration {self.configuration!r}; "
                              f"expected one of {', '.join(CONFIGURATIONS)}")
        if self.configurations is None:
            self.configurations = [self.configuration]
        try:
            self.configurations = configuration_names(self.configurations, CONFIGURATIONS)
        except ConfigError as error:
            raise SearchError(str(error)) from None
        if not self.configurations:
            raise SearchError(f"configurations: give at least one of {', '.join(CONFIGURATIONS)}")
        if self.configuration not in self.configurations:
            raise SearchError(f"configurations: the prior's configuration {self.configuration!r} (configuration) is "
                              f"not among the searched ones ({', '.join(self.configurations)}); add it or set "
                              "configuration to one of them")

    def prior_config(self):
        """nnU-Net's default hyperparameters in the prior's configuration (the search's default)."""
        from ..config import TrialConfig

        return TrialConfig(configuration=self.configuration)

    def _check_integers(self) -> None:
        # (name, lowest, highest, may be None)
        limits = [
            ("min_epochs", 1, MAX_EPOCHS_LIMIT, False), ("max_epochs", 1, MAX_EPOCHS_LIMIT, False),
            ("eta", 2, 100, False), ("iterations_per_epoch", 1, MAX_ITERATIONS_LIMIT, False),
            ("max_validation_cases", 1, MAX_ITERATIONS_LIMIT, True), ("seed", 0, SEED_LIMIT - 1, True),
            ("total_epochs", 1, MAX_TOTAL_EPOCHS, True), ("max_trials", 1, MAX_TRIALS_LIMIT, True),
            ("confirm_fold", 0, 4, True), ("confirm_seeds", 1, 100, False), ("workers", 1, MAX_WORKERS, False),
            ("retries", 0, 100, False),
        ]
        for name, low, high, optional in limits:
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not _is_int(value):
                raise SearchError(f"{name}: expected a whole number, got {value!r}")
            if not low <= value <= high:
                raise SearchError(f"{name}: must be between {low} and {high}, got {value}")
        if not self.min_epochs < self.max_epochs:  # type: ignore[operator]
            raise SearchError(f"min_epochs: need min_epochs < max_epochs, got {self.min_epochs} and {self.max_epochs}")

    def _check_numbers(self) -> None:
        # (name, lowest allowed (exclusive when strict), highest, strict, may be None)
        limits = [
            ("runtime_weight", 0.0, 100.0, False, False), ("stale_after", 0.0, MAX_SECONDS, True, False),
            ("wall_time", 0.0, MAX_SECONDS, True, True), ("budget", 0.0, MAX_BUDGET_F, True, True),
        ]
        for name, low, high, strict, optional in limits:
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SearchError(f"{name}: expected a number, got {value!r}")
            if not math.isfinite(value):
                raise SearchError(f"{name}: must be a finite number, got {value}")
            if (value <= low if strict else value < low) or value > high:
                bound = f"> {low:g}" if strict else f">= {low:g}"
                raise SearchError(f"{name}: must be {bound} and at most {high:g}, got {value}")
            setattr(self, name, float(value))

    def _check_folds(self) -> None:
        try:
            self.folds = parse_folds(self.folds)
            if self.final_folds is not None:
                self.final_folds = parse_folds(self.final_folds)
        except AutoNNUNetError as error:
            raise SearchError(f"folds: {error}") from None
        if self.confirm_fold is not None and self.confirm_fold in self.folds:
            raise SearchError(f"confirm_fold: fold {self.confirm_fold} is a search fold ({self.folds}); "
                              "confirmation needs a fold the search did not select on")

    @classmethod
    def from_profile(cls, profile: str = "default", **overrides: Any) -> "SearchSettings":
        """Settings with a profile's defaults; ``None`` overrides are ignored."""
        return cls(profile=profile, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self) -> "SearchSettings":
        """Check again (after fields were changed in place); returns self."""
        self.__post_init__()
        return self

    def replace(self, **changes: Any) -> "SearchSettings":
        return dataclasses.replace(self, **changes)

    def effective_total_epochs(self) -> Optional[int]:
        """The epoch budget NePS gets (a ``budget`` in F is planned by search.budget, not here)."""
        if self.total_epochs is None and self.max_trials is None and self.wall_time is None and self.budget is None:
            return 22 * int(self.max_epochs)  # type: ignore[arg-type]
        return self.total_epochs

    # -- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SearchSettings":
        """Rebuild from :meth:`to_dict` output; unknown keys are an error (a typo is not ignored)."""
        if not isinstance(values, dict):
            raise SearchError(f"a search request must be a JSON object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SearchError(f"unknown search settings: {', '.join(unknown)}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "SearchSettings":
        try:
            values = json.loads(text)
        except ValueError as error:
            raise SearchError(f"the search request is not valid JSON: {error}") from None
        return cls.from_dict(values)

    # -- argv ---------------------------------------------------------------------------------

    def to_argv(self) -> list[str]:
        """The flags of ``autonnunet search`` that recreate exactly this record.

        Without ``--workdir``/``--root`` (where the search runs is not part of the request) and
        without ``upload_id`` (a server's concern).
        """
        argv = ["--profile", self.profile, "--space", self.space]
        for name in ("min_epochs", "max_epochs", "eta", "prior_confidence", "iterations_per_epoch",
                     "max_validation_cases", "runtime_weight", "optimizer", "configuration", "seed", "budget",
                     "total_epochs", "max_trials", "wall_time", "confirm_fold", "confirm_seeds", "workers",
                     "launcher", "executor", "device", "retries", "stale_after", "events"):
            value = getattr(self, name)
            if value is not None:
                argv += ["--" + name.replace("_", "-"), repr(value) if isinstance(value, float) else str(value)]
        argv.append("--prior-first" if self.prior_first else "--no-prior-first")
        argv.append("--portfolio" if self.portfolio else "--no-portfolio")
        argv += ["--folds", *map(str, self.folds)]
        if self.configurations != [self.configuration]:
            argv += ["--configurations", *self.configurations]
        if self.final_folds is not None:
            argv += ["--final-folds", *map(str, self.final_folds)]
        if self.gpus is not None:
            argv += ["--gpus", *self.gpus] if self.gpus else ["--gpus", "none"]
        for key, value in self.slurm.items():
            argv += ["--slurm", f"{key}={json.dumps(value)}"]
        return argv

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> "SearchSettings":
        """Parse ``autonnunet search`` flags (as :meth:`to_argv` writes them) into a record."""
        from .cli import build_parser, settings_from_args

        args = build_parser().parse_args(["--root", "-", *argv])
        return settings_from_args(args, stored=None)


#: Fields a flag of ``autonnunet search`` sets (the CLI's overrides of a stored or requested record).
ARGV_FIELDS = tuple(f.name for f in dataclasses.fields(SearchSettings) if f.name != "upload_id")
