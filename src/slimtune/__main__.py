"""``python -m slimtune``: the ``slimtune`` command (what ``torchrun -m slimtune train ...`` starts)."""

import sys

from slimtune.cli import main

if __name__ == "__main__":
    sys.exit(main())
