"""Load the frozen parts of a Stable Diffusion model (folder or hub id), and build tiny ones.

The same `load_components` path serves real SD 1.x/2.x models and the project's own test
and toy-world models, so nothing is tested through a mock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from mcpl.errors import ModelLoadError
from mcpl.method.model_files import read_hints

COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


@dataclass
class Components:
    """Frozen model parts plus facts the trainer needs about them."""

    name: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDPMScheduler
    device: torch.device
    dtype: torch.dtype
    hints: dict

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_factor


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
    """Load tokenizer, text encoder, UNet, VAE and scheduler, all frozen, in eval mode."""
    device = pick_device(str(device) if device is not None else None)
    dtype = dtype or frozen_dtype(device)
    path = Path(model)
    if path.exists():
        missing = [c for c in COMPONENTS if not (path / c).is_dir()]
        if missing:
            raise ModelLoadError(
                f"{model} is not a complete diffusers Stable Diffusion folder: missing {', '.join(missing)} "
                f"(expected subfolders {', '.join(COMPONENTS)})")
    elif model.startswith((".", "/", "~")) or os.sep in model and model.count("/") > 1:
        raise ModelLoadError(f"model folder {model} does not exist")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=dtype)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=dtype)
        scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelLoadError(
            f"cannot load model {model!r}: {err}\n"
            + ("HF_HUB_OFFLINE=1: a hub id works only if it is fully in the local cache; "
               "pass a local diffusers folder instead." if offline else
               "Pass a diffusers Stable Diffusion folder or a hub id that is reachable or cached.")
        ) from err
    for module in (text_encoder, unet, vae):
        module.requires_grad_(False).eval().to(device)
    hints = read_hints(model)
    return Components(model, tokenizer, text_encoder, unet, vae, scheduler, device, dtype, hints)
