"""The job server (``autonnunet serve``): run searches on a GPU machine for remote users.

One concept per module, in the order a request meets them:

- :mod:`.settings`: how the server runs (``ServerSettings``), the data directory, API errors
- :mod:`.views`: the request and response records of the HTTP API
- :mod:`.app`: the FastAPI application (auth, error bodies, routes)
- :mod:`.uploads`: resumable chunked uploads, archive checks, dataset validation
- :mod:`.queue`: the FIFO job queue with one slot per GPU, supervisor processes, progress
- :mod:`.store`: all durable state in one SQLite file
- :mod:`.cli`: the ``serve`` and ``token`` verbs

Names are loaded lazily: FastAPI is imported only when an app is created.
"""

from __future__ import annotations

from ...lazy import lazy_exports

_EXPORTS = {
    "ServerSettings": ".settings",
    "DataDir": ".settings",
    "ApiError": ".settings",
    "UploadError": ".settings",
    "parse_gpus": ".settings",
    "default_data_dir": ".settings",
    "create_app": ".app",
    "Server": ".app",
    "Store": ".store",
    "StoreError": ".store",
    "JobQueue": ".queue",
    "UploadService": ".uploads",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
