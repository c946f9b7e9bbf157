"""`python -m cosmos3_offload ...`: the console script, as `torchrun -m` and `generate --gpus N` start it."""

from __future__ import annotations

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
