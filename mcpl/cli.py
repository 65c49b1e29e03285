"""`mcpl` command line: one sub-command per module in mcpl/commands (each has `register`).

Every command parses, calls the library, prints. Errors a user can fix are `MCPLError`s:
printed as `error: ...` without a traceback, with the documented exit code
(mcpl.errors: 0 ok, 1 partial, 2 bad input, 3 service unreachable, 130 interrupted).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ("train", "generate", "data", "batch", "evaluate", "registry")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcpl", description="Multi-Concept Prompt Learning: learn one new word per object of an image.",
        epilog="Run `mcpl COMMAND --help` for each command's options. Exit codes: 0 ok, 1 some rows or jobs "
               "failed, 2 bad input, 3 MLflow unreachable, 130 interrupted.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"mcpl.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mcpl.errors import EXIT_INTERRUPTED, MCPLError

    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except MCPLError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted; checkpoints written so far are kept, rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
