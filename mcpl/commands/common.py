"""Options and helpers shared by several sub-commands."""

from __future__ import annotations

import argparse

import torch


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="diffusers Stable Diffusion folder or hub id (SD 1.x/2.x). "
                             "Default: the embedded toy-world model.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")


def resolve_model(args: argparse.Namespace) -> str:
    from mcpl.method.models import default_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return args.model or default_model()
