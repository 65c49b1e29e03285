"""Options and helpers shared by several sub-commands (import-light: `mcpl --help` loads no torch)."""

from __future__ import annotations

import argparse


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="diffusers model folder or hub id (Stable Diffusion 1.x/2.x). "
                             "Default: the embedded toy-world model.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")


def configure_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def resolve_model(model: str | None) -> str:
    """The --model given, else the embedded default."""
    from mcpl.method.model_files import default_model

    return model or default_model()


def quiet_libraries() -> None:
    """No weight-loading bars, download bars or import notices from the libraries (pipeline logs)."""
    from mcpl.pipeline.progress import quiet_libraries as quiet

    quiet()
