"""Load the frozen parts of a Stable Diffusion model (folder or hub id), and build tiny ones.

The same `load_components` path serves real SD 1.x/2.x models and the project's own test
and toy-world models, so nothing is tested through a mock.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
TOY_MODEL = REPO_ROOT / "models" / "toyworld"
COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
# Optional per-model defaults in the model folder: {"learning_rate": float,
# "attention_downscale": int, "templates": [str, ...]} (e.g. a model that never saw "a photo of").
HINTS_FILE = "mcpl_hints.json"


class ModelLoadError(RuntimeError):
    """The base model cannot be loaded; the message says what is missing and what to do."""


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


def default_model() -> str:
    """The embedded default: the toy-world model when shipped, else a tiny model built once."""
    if (TOY_MODEL / "model_index.json").exists():
        return str(TOY_MODEL)
    tiny = REPO_ROOT / "models" / "tiny-random"
    if not (tiny / "model_index.json").exists():
        build_tiny_model(tiny)
    return str(tiny)


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
    hints_path = path / HINTS_FILE
    hints = json.loads(hints_path.read_text()) if hints_path.exists() else {}
    return Components(model, tokenizer, text_encoder, unet, vae, scheduler, device, dtype, hints)


@lru_cache(maxsize=8)
def model_hash(model: str) -> str:
    """sha256 over a model folder's weight and config files (names + bytes), short form."""
    path = Path(model)
    if not path.exists():
        return "hub:" + model
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Tiny models, built in code, saved as real diffusers folders (tests and first demo).

TINY_WORDS = (
    "a an the of on in and with photo picture image rendering cropped close-up bright good clean nice "
    "red green blue yellow brown circle square triangle dog cat skateboard board object thing rolling "
    "big small left right next to"
).split()


def build_tiny_tokenizer(out_dir: Path, words: tuple[str, ...] | list[str] = TINY_WORDS,
                         max_length: int = 32) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over a small word list plus single characters (any word encodes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789'-.,!?")
    vocab_list = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merges.append((pieces[0], pieces[1]))
            if merged not in vocab_list:
                vocab_list.append(merged)
            pieces = [merged] + pieces[2:]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=max_length)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_tiny_model(out_dir: str | Path, seed: int = 0, sample_size: int = 8,
                     cross_attention_dim: int = 32) -> Path:
    """Random tiny SD components (~1 M params) saved as a StableDiffusionPipeline folder."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(out_dir / "_tokenizer_build")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=sample_size * 2)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    _remove_tree(out_dir / "_tokenizer_build")
    return out_dir


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
