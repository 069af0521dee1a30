"""The ``autonnunet`` command.

Each concept module contributes its own verbs through an ``add_commands(subparsers)`` function, so
the command line stays next to the code it drives. Those modules keep heavy imports (torch,
nnunetv2, neps) inside functions. When the verb is known from the arguments, only the module that
owns it is imported: ``autonnunet serve`` or ``autonnunet remote`` never load numpy/SimpleITK
through the dataset module, which keeps the server small and every verb quick to start.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from . import __version__
from .errors import AutoNNUNetError

#: Which module owns each verb (checked against the modules by the tests).
VERB_MODULES = {
    "dataset": "AutoNNUNetLib.dataset.cli",
    "fingerprint": "AutoNNUNetLib.fingerprint",
    "train": "AutoNNUNetLib.trainer",
    "export-model": "AutoNNUNetLib.model",
    "import-model": "AutoNNUNetLib.model",
    "predict": "AutoNNUNetLib.inference",
    "demo": "AutoNNUNetLib.demo",
    "search": "AutoNNUNetLib.search.cli",
    "report": "AutoNNUNetLib.search.report",
    "serve": "AutoNNUNetLib.remote.server.cli",
    "token": "AutoNNUNetLib.remote.server.cli",
    "remote": "AutoNNUNetLib.remote.cli",
    "finalize": "AutoNNUNetLib.selection.cli",
    "select": "AutoNNUNetLib.selection.cli",
}

#: Modules that register verbs, in the order their verbs appear in ``--help``.
COMMAND_MODULES = tuple(dict.fromkeys(VERB_MODULES.values()))


class CommandError(AutoNNUNetError):
    """A user-facing failure: printed as one line, exit status 2, no traceback."""


def _requested_verb(argv: Sequence[str]) -> Optional[str]:
    """The verb named in ``argv`` (the first word after the global options), if it is known."""
    for word in argv:
        if word in ("-v", "--verbose"):
            continue
        return word if word in VERB_MODULES else None
    return None


def build_parser(verb: Optional[str] = None) -> argparse.ArgumentParser:
    """The full parser, or (with ``verb``) one that only registers the module owning that verb."""
    parser = argparse.ArgumentParser(
        prog="autonnunet",
        description="Find the best nnU-Net for your labeled volumes (nnU-Net + PriorBand search).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (VERB_MODULES[verb],) if verb is not None else COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            # Only tolerate the module itself being absent (optional parts such as the server).
            if error.name in (name, "fastapi", "uvicorn"):
                continue
            raise
        add_commands = getattr(module, "add_commands", None)
        if add_commands is not None:
            add_commands(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_requested_verb(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler = getattr(args, "func", None)
    if handler is None:
        parser.print_help()
        return 1
    try:
        result = handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # user-facing errors of the library carry their own message
        if args.verbose or not _is_user_error(error):
            raise
        print(f"autonnunet {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


def _is_user_error(error: Exception) -> bool:
    """Library errors meant for users (bad input, missing steps) print without a traceback.

    The library raises them as :class:`AutoNNUNetError`; a missing or existing file named by the
    user (``FileNotFoundError`` / ``FileExistsError`` from a path argument) is one too.
    """
    return isinstance(error, (AutoNNUNetError, FileNotFoundError, FileExistsError))


if __name__ == "__main__":
    sys.exit(main())
