"""Request and response records of the HTTP API (FastAPI renders dataclasses as JSON schemas).

No ``from __future__ import annotations``: FastAPI/pydantic read these annotations at runtime.
"""

from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal, Optional

from pydantic import Field

from .store import Artifact, UploadRecord

#: Largest declared upload size the API takes (a number, not a promise: --max-upload-gb decides).
MAX_DECLARED_SIZE = 1 << 62

ERROR_DESCRIPTIONS = {
    400: "the connection dropped during the request body",
    401: "missing or invalid token (`WWW-Authenticate: Bearer`)",
    404: "no such id for this user (another user's id answers the same)",
    409: "the object is not in a state that allows this",
    413: "larger than the server accepts",
    422: "invalid request: a parameter is missing, malformed or out of range",
    429: "the user has as many unfinished jobs or open uploads as the server allows",
    507: "not enough free disk space on the server",
}


@dataclass
class Problem:
    """One invalid parameter of a request (422 answers list them)."""

    loc: list[str]
    msg: str
    type: str


@dataclass
class ErrorBody:
    """Every error answer: a message written for the user (and, for 422, the parameters at fault)."""

    detail: str
    errors: Optional[list[Problem]] = None


@dataclass
class Health:
    status: str
    version: str
    executor: str
    slots: int
    gpus: list[str]


@dataclass
class Me:
    user: str


@dataclass
class UploadCreate:
    __pydantic_config__ = {"extra": "forbid"}

    size: Annotated[int, Field(gt=0, le=MAX_DECLARED_SIZE, description="bytes of the archive")]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$", description="SHA-256 (hex) of the archive")]
    filename: Annotated[str, Field(max_length=255)] = "dataset.tar"
    kind: Literal["dataset", "images", "model"] = "dataset"


@dataclass
class UploadView:
    id: str
    kind: str
    filename: str
    size: int
    sha256: str
    received: int
    state: str
    created: float
    updated: float
    error: Optional[str] = None
    summary: Optional[dict[str, Any]] = None

    @classmethod
    def of(cls, record: UploadRecord) -> "UploadView":
        data = asdict(record)
        data.pop("user")
        return cls(**data)


@dataclass
class JobView:
    id: str
    kind: str
    state: str
    params: dict[str, Any]
    created: float
    started: Optional[float] = None
    finished: Optional[float] = None
    attempts: int = 0
    exit_code: Optional[int] = None
    error: Optional[str] = None
    progress: Optional[dict[str, Any]] = None
    artifacts: list[Artifact] = field(default_factory=list)
    devices: Optional[list[str]] = None
    cancel_requested: bool = False
    queue_position: Optional[int] = None


@dataclass
class LogChunk:
    offset: int
    next_offset: int
    size: int
    text: str
    complete: bool  # the job has ended and everything up to ``size`` was returned


@dataclass
class EventsChunk:
    events: list[dict[str, Any]]
    next_offset: int
    complete: bool



# -- job requests ---------------------------------------------------------------------------------
# The bodies of POST /v1/jobs/{kind} are the job kinds' request records (jobs.params), which check
# every value in __post_init__ (the one place the rules live). Their JSON schemas are the
# records' own, with the records' limits written in, so the published schema says what the
# server accepts.


def _request_limits() -> dict[str, dict[str, dict[str, Any]]]:
    from ...jobs import params
    from ...search import settings as search
    from ...selection.candidates import OTHER_CONFIGURATIONS

    def between(low: float, high: float, exclusive: bool = False) -> dict[str, Any]:
        return {"exclusiveMinimum" if exclusive else "minimum": low, "maximum": high}

    return {
        "search": {
            "space": {"enum": list(search.SPACE_NAMES)}, "profile": {"enum": list(search.PROFILES)},
            "optimizer": {"enum": list(search.OPTIMIZER_NAMES)},
            "prior_confidence": {"enum": list(search.CONFIDENCES)},
            "min_epochs": between(1, search.MAX_EPOCHS_LIMIT), "max_epochs": between(1, search.MAX_EPOCHS_LIMIT),
            "eta": between(2, 100), "iterations_per_epoch": between(1, search.MAX_ITERATIONS_LIMIT),
            "max_validation_cases": between(1, search.MAX_ITERATIONS_LIMIT),
            "seed": between(0, search.SEED_LIMIT - 1), "total_epochs": between(1, search.MAX_TOTAL_EPOCHS),
            "max_trials": between(1, search.MAX_TRIALS_LIMIT), "workers": between(1, search.MAX_WORKERS),
            "runtime_weight": between(0.0, 100.0), "wall_time": between(0.0, search.MAX_SECONDS, True),
            "budget": between(0.0, search.MAX_BUDGET_F, True), "folds": {"minimum": 0, "maximum": 4},
        },
        "train": {
            "epochs": between(1, params.MAX_EPOCHS), "max_epochs": between(1, params.MAX_EPOCHS),
            "iterations_per_epoch": between(1, params.MAX_ITERATIONS), "seed": between(0, search.SEED_LIMIT - 1),
            "folds": {"minimum": 0, "maximum": 4},
        },
        "predict": {"folds": {"minimum": 0, "maximum": 4}},
        "select": {
            "epochs": between(1, params.MAX_EPOCHS), "iterations_per_epoch": between(1, params.MAX_ITERATIONS),
            "top": between(0, params.MAX_TOP), "seed": between(0, search.SEED_LIMIT - 1),
            "folds": {"minimum": 0, "maximum": 4}, "configurations": {"enum": list(OTHER_CONFIGURATIONS)},
        },
    }


def _constrain(schema: dict[str, Any], rule: dict[str, Any]) -> None:
    """Write ``rule`` into the typed branches of a property schema (``anyOf`` of value | null)."""
    branches = schema.get("anyOf", [schema])
    for branch in branches:
        kind = branch.get("type")
        if "enum" in rule and kind == "string" and "const" not in branch:
            branch["enum"] = rule["enum"]
        elif kind in ("integer", "number"):
            branch.update({k: v for k, v in rule.items() if k != "enum"})
        elif kind == "array" and branch.get("items", {}).get("type") == "integer":
            branch["items"].update({k: v for k, v in rule.items() if k != "enum"})
        elif kind == "array" and branch.get("items", {}).get("type") == "string" and "enum" in rule:
            branch["items"]["enum"] = rule["enum"]


def request_schema(kind: str) -> dict[str, Any]:
    """The JSON schema of a job kind's request body (no ``$ref``: it is inlined in the operation)."""
    from pydantic import TypeAdapter

    from ...jobs import PARAMS_TYPES

    schema = TypeAdapter(PARAMS_TYPES[kind]).json_schema()
    for name, rule in _request_limits()[kind].items():
        if name in schema.get("properties", {}):
            _constrain(schema["properties"][name], rule)
    return schema
