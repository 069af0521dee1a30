"""The remote runner: a job server on a GPU machine and its client.

- :mod:`.client`: :class:`RemoteClient` (``requests`` only; what Slicer and ``autonnunet remote`` use)
- :mod:`.job`: :class:`RemoteJob`, the server's job behind the same Job protocol as a local job
- :mod:`.cli`: the ``autonnunet remote ...`` verbs
- :mod:`.server`: ``autonnunet serve`` (FastAPI, SQLite store, uploads, job queue)

Names are loaded lazily: importing the package loads neither ``requests`` nor FastAPI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RemoteClient": ".client",
    "RemoteError": ".client",
    "make_archive": ".client",
    "RemoteJob": ".job",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
