"""SDXL (`StableDiffusionXLPipeline` folders): two CLIP text encoders, both carrying learned rows.

As diffusers' SDXL pipeline encodes a prompt: the penultimate hidden states of text_encoder
(CLIP ViT-L) and text_encoder_2 (OpenCLIP bigG) concatenated on the feature axis, the pooled
projection of text_encoder_2 as `text_embeds`, and `time_ids` = original size + crop top-left
+ target size of each training image. Every new token gets a row in both tables, each
initialised from the initializer word in that encoder's own table. PromptCL / Bind adj use
the concatenated conditioning vectors (what the UNet sees), so both encoders' rows learn
from it. Exports: diffusers' two files (`learned_embeds.safetensors` for text_encoder,
`learned_embeds_2.safetensors` for text_encoder_2) and one `{clip_l, clip_g}` file for
A1111 / ComfyUI / kohya.
"""

from __future__ import annotations

import torch

from mcpl.method.families.base import Conditioning, Family, TextStack, weights_policy


def fix_legacy_eos(encoder, tokenizer) -> None:
    """Old CLIP configs say eos_token_id=2, which makes transformers pool at the highest token id:
    with added tokens that is the placeholder, not the end of the prompt. Point it at the real EOS."""
    eos = tokenizer.eos_token_id
    if eos is None or getattr(encoder.config, "eos_token_id", None) == eos:
        return
    encoder.config.eos_token_id = eos
    for module in (encoder, getattr(encoder, "text_model", None)):
        if module is not None and hasattr(module, "eos_token_id"):
            module.eos_token_id = eos


class StableDiffusionXL(Family):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    description = "SDXL (StableDiffusionXLPipeline)"

    def text_subfolders(self) -> tuple[str, ...]:
        return ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")

    def load_stacks(self, model: str, dtype: torch.dtype) -> list[TextStack]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tok1 = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        tok2 = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2")
        te1 = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype,
                                            use_safetensors=weights_policy(model, "text_encoder"))
        te2 = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", dtype=dtype,
                                                          use_safetensors=weights_policy(model, "text_encoder_2"))
        fix_legacy_eos(te1, tok1)
        fix_legacy_eos(te2, tok2)
        return [TextStack("text_encoder", tok1, te1, "clip_l", ""),
                TextStack("text_encoder_2", tok2, te2, "clip_g", "_2")]

    def size_conditioning(self, image_sizes: list[tuple[int, int]], resolution: int) -> torch.Tensor:
        """time_ids per image: (original h, w, crop top, crop left, target h, w), as SDXL was trained.

        mcpl resizes the short side to `resolution` and centre-crops, so the crop is measured in
        the resized image, as diffusers' SDXL training script does.
        """
        rows = []
        for width, height in image_sizes:
            scale = resolution / min(width, height)
            resized_h, resized_w = round(height * scale), round(width * scale)
            rows.append([height, width, (resized_h - resolution) // 2, (resized_w - resolution) // 2,
                         resolution, resolution])
        return torch.tensor(rows, dtype=torch.float32)

    def condition(self, stacks: list[TextStack], ids: list[torch.Tensor],
                  sizes: torch.Tensor | None = None) -> Conditioning:
        te1, te2 = stacks[0].encoder, stacks[1].encoder
        out1 = te1(ids[0].to(te1.device), output_hidden_states=True)
        out2 = te2(ids[1].to(te2.device), output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2].to(out1.hidden_states[-2].dtype)], dim=-1)
        if sizes is None:
            raise ValueError("SDXL conditioning needs the images' size conditioning (time ids)")
        return Conditioning(hidden, {"text_embeds": out2.text_embeds, "time_ids": sizes.to(hidden.device)})

    def pipeline(self, model: str, device: torch.device, dtype: torch.dtype):
        from diffusers import DDIMScheduler, StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(model, dtype=dtype, add_watermarker=False,
                                                         use_safetensors=weights_policy(model, "unet"))
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        fix_legacy_eos(pipe.text_encoder, pipe.tokenizer)
        fix_legacy_eos(pipe.text_encoder_2, pipe.tokenizer_2)
        return pipe

    def pipeline_from(self, c):
        import copy

        from diffusers import DDIMScheduler, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=c.vae, text_encoder=c.stacks[0].encoder, text_encoder_2=c.stacks[1].encoder,
            tokenizer=copy.deepcopy(c.stacks[0].tokenizer), tokenizer_2=copy.deepcopy(c.stacks[1].tokenizer),
            unet=c.unet, scheduler=DDIMScheduler.from_pretrained(c.name, subfolder="scheduler"), add_watermarker=False)

    def pipeline_stacks(self, pipe) -> list[TextStack]:
        return [TextStack("text_encoder", pipe.tokenizer, pipe.text_encoder, "clip_l", ""),
                TextStack("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2, "clip_g", "_2")]

    def add_rows(self, pipe, token: str, vectors: list[torch.Tensor]) -> None:
        """Through diffusers' own loader, once per encoder (as its docs show for SDXL)."""
        pipe.load_textual_inversion({token: vectors[0].to(pipe.text_encoder.dtype)}, token=token,
                                    text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion({token: vectors[1].to(pipe.text_encoder_2.dtype)}, token=token,
                                    text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
