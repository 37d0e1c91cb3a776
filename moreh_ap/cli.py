# The `moreh-ap` command line.
from __future__ import annotations

import argparse
import sys

from moreh_ap._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moreh-ap",
        description="moreh_ap: automatic parallelization for PyTorch training scripts.",
    )
    parser.add_argument("--version", action="version", version=f"moreh-ap {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moreh-ap`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
