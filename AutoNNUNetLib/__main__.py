"""``python -m AutoNNUNetLib`` is the ``autonnunet`` command (used for subprocesses)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
