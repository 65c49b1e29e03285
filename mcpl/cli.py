"""`mcpl` command line: one sub-command per module in mcpl/commands (each has `register`)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ("train", "generate", "data", "batch", "evaluate", "registry")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcpl", description="Multi-Concept Prompt Learning: learn one new word per object of an image.",
        epilog="Run `mcpl COMMAND --help` for each command's options.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"mcpl.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; checkpoints written so far are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
