"""What every model family shares: the loaded components, the text stacks that carry learned rows,
and the adapter interface the trainer, generation, export and registry ask.

A family (one module each: sd, sdxl, ldm) answers, for its diffusers pipeline class:
which tokenizer/text-encoder pairs carry learned rows (`encoders`), how prompt ids become
UNet conditioning (`condition`, incl. extra kwargs), whether its text encoders are causal,
how a concept's rows are written for other tools (`export_keys`), and how to build and
feed a sampling pipeline. Nothing outside the families asks "is this SDXL?".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mcpl.errors import ModelLoadError

AUTOENCODERS = ("AutoencoderKL", "VQModel")  # image encoders the latent cache reads (mcpl.method.images)

PICKLE_OPT_IN = "MCPL_ALLOW_PICKLE_WEIGHTS"  # =1: allow loading pickled .bin weights (trusted folders only)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class TextStack:
    """One tokenizer + text encoder pair whose token table gets the learned rows."""

    key: str  # the encoder's subfolder: text_encoder, text_encoder_2, bert
    tokenizer: Any
    encoder: nn.Module
    export_key: str = ""  # its key in one-file exports for A1111/ComfyUI/kohya (clip_l, clip_g)
    file_suffix: str = ""  # diffusers' per-encoder file names: learned_embeds{suffix}.safetensors
    max_length: int = 0  # tokens per prompt (0: the tokenizer's model_max_length)

    @property
    def length(self) -> int:
        return self.max_length or int(self.tokenizer.model_max_length)

    @property
    def width(self) -> int:
        module = self.encoder.get_input_embeddings()
        return int(getattr(module, "base", module).weight.shape[-1])


@dataclass
class Conditioning:
    """What the UNet is called with: `hidden` (B, L, D) and the family's extra kwargs."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def kwargs(self, dtype: torch.dtype) -> dict:
        out: dict[str, Any] = {"encoder_hidden_states": self.hidden.to(dtype)}
        if self.added is not None:
            out["added_cond_kwargs"] = {k: v.to(dtype) for k, v in self.added.items()}
        return out

    def select(self, rows: slice) -> Conditioning:
        """Some samples of the batch (e.g. one job's slice of a pack)."""
        added = None if self.added is None else {k: v[rows] for k, v in self.added.items()}
        return Conditioning(self.hidden[rows], added)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Several jobs' conditioning as one UNet batch (packing)."""
        added = None
        if parts[0].added is not None:
            added = {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added}  # type: ignore[index]
        return Conditioning(torch.cat([p.hidden for p in parts]), added)


@dataclass
class Components:
    """Frozen model parts plus facts the trainer needs about them."""

    name: str
    family: Family
    stacks: list[TextStack]
    unet: Any
    vae: Any
    scheduler: Any
    device: torch.device
    dtype: torch.dtype
    hints: dict = field(default_factory=dict)

    @property
    def tokenizer(self):
        """The primary tokenizer (the one whose positions the attention maps use)."""
        return self.stacks[0].tokenizer

    @property
    def text_encoder(self):
        return self.stacks[0].encoder

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_factor

    @property
    def widths(self) -> list[int]:
        return [s.width for s in self.stacks]


def weights_policy(model: str, subfolder: str) -> bool | None:
    """`use_safetensors` for one component: True where the folder has safetensors; pickled-only
    weights are refused unless MCPL_ALLOW_PICKLE_WEIGHTS=1 (unpickling runs code from the file)."""
    allow = os.environ.get(PICKLE_OPT_IN) == "1"
    folder = Path(model) / subfolder
    if not folder.is_dir():
        return None if allow else True  # a hub id: insist on safetensors unless the user opted in
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return True
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickled and not allow:
        raise ModelLoadError(
            f"{folder} has only pickled weights ({', '.join(sorted(pickled))}); loading them runs code from the "
            f"file. Convert them to safetensors, or set {PICKLE_OPT_IN}=1 if you trust this folder")
    return None if pickled else True


class Family:
    """The adapter interface. Subclasses set the class attributes and implement the hooks."""

    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]  # model_index.json `_class_name`s this family loads
    description: ClassVar[str]
    vae_subfolder: ClassVar[str] = "vae"
    causal_text: ClassVar[bool] = True  # later positions never change earlier ones' features
    default_attention_downscale: ClassVar[int] = 4  # latent/4 = image/32 with a factor-8 VAE

    # ---- loading
    def subfolders(self) -> tuple[str, ...]:
        return (*self.text_subfolders(), "unet", self.vae_subfolder, "scheduler")

    def text_subfolders(self) -> tuple[str, ...]:
        raise NotImplementedError

    def load_stacks(self, model: str, dtype: torch.dtype) -> list[TextStack]:
        raise NotImplementedError

    def load(self, model: str, device: torch.device, dtype: torch.dtype, hints: dict) -> Components:
        import diffusers
        from diffusers import DDPMScheduler, UNet2DConditionModel

        from mcpl.method.families.index import component_class

        stacks = self.load_stacks(model, dtype)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=dtype,
                                                    use_safetensors=weights_policy(model, "unet"))
        # The autoencoder's class as model_index.json names it: KL (SD, SDXL, ldm-text2im-large-256) or VQ
        # (other latent-diffusion folders); anything else is refused rather than half-loaded.
        name = component_class(model, self.vae_subfolder, "AutoencoderKL")
        if name not in AUTOENCODERS:
            raise ModelLoadError(f"{model}: {self.vae_subfolder} is a {name}; mcpl encodes images with "
                                 f"{' or '.join(AUTOENCODERS)}")
        vae = getattr(diffusers, name).from_pretrained(model, subfolder=self.vae_subfolder, dtype=dtype,
                                                       use_safetensors=weights_policy(model, self.vae_subfolder))
        scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
        for module in (*(s.encoder for s in stacks), unet, vae):
            module.requires_grad_(False).eval().to(device)
        return Components(model, self, stacks, unet, vae, scheduler, device, dtype, hints)

    # ---- training
    def size_conditioning(self, image_sizes: list[tuple[int, int]], resolution: int) -> torch.Tensor | None:
        """Per-image extra conditioning from the real image size (SDXL's time ids); None if unused."""
        return None

    def condition(self, stacks: list[TextStack], ids: list[torch.Tensor],
                  sizes: torch.Tensor | None = None) -> Conditioning:
        raise NotImplementedError

    # ---- sampling and files
    def pipeline(self, model: str, device: torch.device, dtype: torch.dtype):
        raise NotImplementedError

    def pipeline_stacks(self, pipe) -> list[TextStack]:
        raise NotImplementedError

    def pipeline_from(self, c: Components):
        """A sampling pipeline on already loaded components (shared modules, copied tokenizers)."""
        raise NotImplementedError

    def add_rows(self, pipe, token: str, vectors: list[torch.Tensor]) -> None:
        """Load one concept's rows (one tensor [n, width] per text stack) into a sampling pipeline."""
        raise NotImplementedError

    def expand_prompt(self, pipe, prompt: str) -> str:
        """The prompt as the pipeline tokenises it (multi-vector tokens `t` -> `t t_1 ...`)."""
        return pipe.maybe_convert_prompt(prompt, pipe.tokenizer)

    def sample(self, pipe, prompt: str, num_images: int, steps: int, guidance: float, generator, size: int) -> list:
        return pipe(prompt, num_images_per_prompt=num_images, num_inference_steps=steps, guidance_scale=guidance,
                    generator=generator, height=size, width=size).images
