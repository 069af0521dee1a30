"""Progress events: the one format shared by the CLI, the Slicer module and the remote runner.

Long work (training, search) reports :class:`ProgressEvent` records. They are appended as JSON lines
to an events file, which a poller (the Slicer module's QTimer, the job server) reads from a byte
offset, so a reader never has to hold the producer's process or parse free-form logs.

Event kinds and their ``data`` keys (all optional except where noted):

- ``stage``: ``name`` (dataset, fingerprint, train, search, predict), ``message``
- ``trial_started``: ``trial`` (id), ``rung``, ``epochs`` (fidelity), ``config``
- ``epoch``: ``trial``, ``fold``, ``epoch``, ``max_epochs``, ``loss``, ``seconds``
- ``trial_finished``: ``trial``, ``rung``, ``epochs``, ``dice`` (mean), ``dice_per_class``,
  ``train_seconds``, ``state`` (succeeded/failed), ``error``
- ``best``: ``trial``, ``dice``, ``epochs``
- ``progress``: ``fraction`` (0-1), ``eta_seconds``, ``message``
- ``finished``: ``state`` (succeeded/failed/cancelled), ``message``
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union


@dataclass
class ProgressEvent:
    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "time": self.time, "data": self.data}, default=_jsonable)

    @classmethod
    def from_json(cls, line: str) -> "ProgressEvent":
        raw = json.loads(line)
        return cls(kind=raw["kind"], data=raw.get("data", {}), time=raw.get("time", 0.0))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


ProgressCallback = Callable[[ProgressEvent], None]


class EventWriter:
    """Append events to a JSON-lines file; each line is written and flushed whole."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: ProgressEvent) -> None:
        line = event.to_json() + "\n"
        # O_APPEND keeps lines from several worker processes whole.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)

    def emit(self, kind: str, **data: Any) -> None:
        self(ProgressEvent(kind, data))


def read_events(path: Union[str, Path], offset: int = 0) -> tuple[list[ProgressEvent], int]:
    """Read complete event lines from ``offset``; return them and the offset to read from next.

    A partially written last line is left for the next call.
    """
    path = Path(path)
    if not path.exists():
        return [], offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        chunk = handle.read()
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for line in chunk[: end + 1].splitlines():
        if line.strip():
            try:
                events.append(ProgressEvent.from_json(line.decode("utf-8")))
            except (ValueError, KeyError):
                continue  # a foreign line in the file must not stop the reader
    return events, offset + end + 1


def fanout(*callbacks: Optional[ProgressCallback]) -> ProgressCallback:
    """One callback that forwards each event to all the given (non-None) callbacks."""
    active = [c for c in callbacks if c is not None]

    def _emit(event: ProgressEvent) -> None:
        for callback in active:
            callback(event)

    return _emit
