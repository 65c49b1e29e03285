"""Load the frozen parts of a model folder or hub id through its family's adapter.

The same `load_components` path serves real SD 1.x/2.x, SDXL and LDM models and the
project's own tiny and toy-world models, so nothing is tested through a mock.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mcpl.errors import ModelLoadError
from mcpl.method.families import Components, family_of
from mcpl.method.model_files import read_hints

__all__ = ["Components", "frozen_dtype", "load_components", "pick_device"]


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def frozen_dtype(device: torch.device) -> torch.dtype:
    """Reduced precision for frozen parts on CUDA (bf16 where supported), fp32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_components(model: str, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> Components:
    """Every frozen part of `model` (its family decides which), in eval mode, on `device`."""
    device = pick_device(str(device) if device is not None else None)
    dtype = dtype or frozen_dtype(device)
    family = family_of(model)
    path = Path(model)
    if path.is_dir():
        missing = [c for c in family.subfolders() if not (path / c).is_dir()]
        if missing:
            raise ModelLoadError(f"{model} is not a complete {family.description} folder: missing "
                                 f"{', '.join(missing)} (expected subfolders {', '.join(family.subfolders())})")
    try:
        return family.load(model, device, dtype, read_hints(model))
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelLoadError(
            f"cannot load model {model!r}: {err}\n"
            + ("HF_HUB_OFFLINE=1: a hub id works only if it is fully in the local cache; "
               "pass a local diffusers folder instead." if offline else
               "Pass a diffusers model folder or a hub id that is reachable or cached.")
        ) from err
