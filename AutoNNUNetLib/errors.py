"""One exception base for everything the library raises on purpose.

A user error (bad input, a missing step, a device that is not there) is an :class:`AutoNNUNetError`:
the CLI prints its message as one line with no traceback, the server answers it as a 4xx, and the
Slicer module shows it in a message box. Anything else is a bug and keeps its traceback.

Concept modules subclass it for their own domain (``DatasetError``, ``SearchError``, ...), so a caller
can catch one step's failures or all of them. The subclasses that were ``ValueError`` before keep
that base too, so existing ``except ValueError`` callers are not broken.
"""

from __future__ import annotations


class AutoNNUNetError(Exception):
    """Base of every error the library raises for bad input or an impossible request."""


class UserInputError(AutoNNUNetError, ValueError):
    """A value given by the user is invalid (names the value and the rule it breaks)."""


class DeviceError(AutoNNUNetError, ValueError):
    """The requested compute device is unknown or not available on this machine."""
