"""Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline` folders): one CLIP text encoder.

Conditioning is the encoder's last hidden state; ε or v prediction comes from the scheduler
config (SD 2.x-v). Concepts load with diffusers' own `load_textual_inversion`.
"""

from __future__ import annotations

import torch

from mcpl.method.families.base import Conditioning, Family, TextStack, weights_policy


class StableDiffusion(Family):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    description = "Stable Diffusion 1.x/2.x (StableDiffusionPipeline)"

    def text_subfolders(self) -> tuple[str, ...]:
        return ("tokenizer", "text_encoder")

    def load_stacks(self, model: str, dtype: torch.dtype) -> list[TextStack]:
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype,
                                                use_safetensors=weights_policy(model, "text_encoder"))
        return [TextStack("text_encoder", tokenizer, encoder)]

    def condition(self, stacks: list[TextStack], ids: list[torch.Tensor],
                  sizes: torch.Tensor | None = None) -> Conditioning:
        encoder = stacks[0].encoder
        return Conditioning(encoder(ids[0].to(encoder.device))[0])

    def pipeline(self, model: str, device: torch.device, dtype: torch.dtype):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(model, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False,
                                                       use_safetensors=weights_policy(model, "unet"))
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return pipe

    def pipeline_from(self, c):
        import copy

        from diffusers import DDIMScheduler, StableDiffusionPipeline

        return StableDiffusionPipeline(vae=c.vae, text_encoder=c.stacks[0].encoder,
                                       tokenizer=copy.deepcopy(c.stacks[0].tokenizer), unet=c.unet,
                                       scheduler=DDIMScheduler.from_pretrained(c.name, subfolder="scheduler"),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def pipeline_stacks(self, pipe) -> list[TextStack]:
        return [TextStack("text_encoder", pipe.tokenizer, pipe.text_encoder)]

    def add_rows(self, pipe, token: str, vectors: list[torch.Tensor]) -> None:
        pipe.load_textual_inversion({token: vectors[0].to(pipe.text_encoder.dtype)}, token=token)
