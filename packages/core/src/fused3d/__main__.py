"""Command line: ``python -m fused3d info``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused3d")
    parser.add_argument("command", choices=["info"], help="info: backends, reasons, versions")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import report

        print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
