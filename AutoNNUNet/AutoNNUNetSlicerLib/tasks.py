"""Short background calls (Test connection), so the UI thread never waits on the network.

A :class:`BackgroundCall` runs one function in its own worker thread; the module's QTimer asks
:meth:`BackgroundCall.done` and then takes :meth:`BackgroundCall.result`. Work that loads torch
or nnU-Net (model zip export/import, the fingerprint summary) does not run here but in a local
job (a child process), so Slicer's process never imports them.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class BackgroundCall:
    def __init__(self, name: str, function: Callable[..., Any], *args: Any, **kwargs: Any):
        self.name = name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"autonnunet-{name}")
        self._future: Future = self._executor.submit(function, *args, **kwargs)
        self._executor.shutdown(wait=False)  # the thread ends with the call

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> Any:
        """The function's value; raises what it raised. Call once :meth:`done` is True."""
        return self._future.result(timeout=0)


def test_connection(url: str, token: str) -> str:
    """What *Test connection* reports: the runner is up, and the token is accepted."""
    from .jobs import remote_client

    # One retry and short timeouts: a wrong URL is reported in seconds, not after the minute of
    # retries a running job's polling allows itself.
    client = remote_client(url, token, timeout=(5.0, 15.0), retries=1)
    health = client.health()  # no token needed: is the server up?
    user = client.whoami()  # needs the token: is it accepted?
    version = health.get("version") if isinstance(health, dict) else None
    return f"Connected as '{user}'." + (f" Runner version {version}." if version else "")
