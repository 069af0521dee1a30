"""The remote runner: a job server on a GPU machine and its client.

- :mod:`.client`: :class:`RemoteClient` (``requests`` only; what Slicer and ``autonnunet remote`` use)
- :mod:`.job`: :class:`RemoteJob`, the server's job behind the same Job protocol as a local job
- :mod:`.cli`: the ``autonnunet remote ...`` verbs
- :mod:`.server`: ``autonnunet serve`` (FastAPI, SQLite store, uploads, job queue)

Names are loaded lazily: importing the package loads neither ``requests`` nor FastAPI.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "RemoteClient": ".client",
    "RemoteError": ".client",
    "make_archive": ".client",
    "RemoteJob": ".job",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
