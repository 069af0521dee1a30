"""Lazy package exports: a package names what it offers, and each name loads on first use.

Every package ``__init__`` of the library uses this, so ``import AutoNNUNetLib.jobs`` (the server,
the Slicer module) does not pull torch or nnU-Net in until a name that needs them is touched.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping, Union

#: A module (relative to the package, ``"..x"`` for a sibling, or absolute ``AutoNNUNetLib.x``),
#: or ``(module, attribute)`` when the exported name differs from the attribute's.
Target = Union[str, tuple[str, str]]


def lazy_exports(package: str, exports: Mapping[str, Target]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` for ``exports`` (name -> target)."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute = target if isinstance(target, tuple) else (target, name)
        if not module.startswith((".", "AutoNNUNetLib")):
            module = f".{module}"
        value = getattr(importlib.import_module(module, package), attribute)
        namespace[name] = value  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
