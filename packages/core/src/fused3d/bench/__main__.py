"""``python -m fused3d.bench``: run the benchmark (see :mod:`fused3d.bench.harness`)."""

from __future__ import annotations

import sys

from .harness import main

if __name__ == "__main__":
    sys.exit(main())
