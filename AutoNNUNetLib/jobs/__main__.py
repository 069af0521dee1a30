"""``python -m AutoNNUNetLib.jobs supervise JOB_DIR``: the supervisor of one job folder."""

import sys

from .supervisor import main

if __name__ == "__main__":
    sys.exit(main())
