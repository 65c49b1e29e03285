"""Generate with learned concepts through a stock diffusers pipeline.

Concepts are loaded with diffusers' own `load_textual_inversion`, so what works here works
in any diffusers program. Attention of each concept is recorded over the whole sampling
trajectory (conditional half of the CFG batch only) and averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from mcpl.concepts.embeddings import load_concept
from mcpl.errors import ModelLoadError, RegistryError
from mcpl.method.attention import AttentionStore, install_capture, restore_processors, select_layers
from mcpl.method.models import frozen_dtype, pick_device


@dataclass
class Generation:
    images: list[Image.Image]
    maps: list[dict[str, torch.Tensor]]  # per image: token -> (h, w), trajectory mean
    prompt: str

    def save(self, out: str | Path) -> Path:
        """image_<i>.png and attention_<i>.png (the image + one overlay per token) per image."""
        from mcpl.concepts.overlay import attention_figure

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for i, (image, maps) in enumerate(zip(self.images, self.maps, strict=True)):
            image.save(out / f"image_{i}.png")
            attention_figure(image, maps, out / f"attention_{i}.png")
        return out


def load_pipeline(model: str, device: str | None = None) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with a DDIM scheduler, frozen parts in the device's dtype."""
    dev = pick_device(device)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model, dtype=frozen_dtype(dev), safety_checker=None,
                                                       requires_safety_checker=False)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model {model!r} as a Stable Diffusion pipeline: {err}") from err
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def load_concepts(pipe: StableDiffusionPipeline, files: list[str | Path],
                  tokens: list[str] | None = None) -> list[str]:
    """Load concept files; `tokens` renames them (two files that both learned <dog>)."""
    loaded = []
    for i, file in enumerate(files):
        token, vectors, _ = load_concept(file)
        token = tokens[i] if tokens else token
        if token in pipe.tokenizer.get_vocab():
            raise RegistryError(f"token {token} is already loaded; give one of the concepts another token")
        pipe.load_textual_inversion({token: vectors.to(pipe.text_encoder.dtype)}, token=token)
        loaded.append(token)
    return loaded


def concept_key_weights(pipe: StableDiffusionPipeline, prompt: str, tokens: list[str]) -> torch.Tensor:
    """(C, L): 1/n at each of a token's n vector positions in the tokenised prompt."""
    converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    ids = pipe.tokenizer(converted, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids[0]
    vocab = pipe.tokenizer.get_vocab()
    weights = torch.zeros(len(tokens), ids.shape[0])
    for c, token in enumerate(tokens):
        family = [vocab[t] for t in vocab if t == token or t.startswith(token + "_")]
        hits = torch.isin(ids, torch.tensor(family)).float()
        weights[c] = hits / hits.sum().clamp_min(1)
    return weights


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompt: str, tokens: list[str], num_images: int = 4,
             steps: int = 25, guidance: float = 5.0, seed: int = 0, size: int | None = None,
             attention_downscale: int | None = None) -> Generation:
    """Sample `num_images` images of `prompt`; record each token's attention along the way."""
    vae_factor = pipe.vae_scale_factor
    size = size or int(pipe.unet.config.sample_size) * vae_factor
    store = AttentionStore()
    weights = concept_key_weights(pipe, prompt, tokens)
    store.key_weights = weights[None].expand(num_images, -1, -1)
    cfg = guidance > 1.0
    store.rows = slice(num_images, 2 * num_images) if cfg else slice(None)
    store.latent_hw = (size // vae_factor, size // vae_factor)
    layers = select_layers(pipe.unet, None, attention_downscale)
    previous = install_capture(pipe.unet, store, layers)
    try:
        generator = torch.Generator("cpu").manual_seed(seed)
        images = pipe(prompt, num_images_per_prompt=num_images, num_inference_steps=steps,
                      guidance_scale=guidance, generator=generator, height=size, width=size).images
    finally:
        restore_processors(pipe.unet, previous)
    mean = store.aggregate() if tokens else torch.zeros(num_images, 0, 1, 1)
    maps = [{t: mean[i, c].cpu() for c, t in enumerate(tokens)} for i in range(num_images)]
    return Generation(images=images, maps=maps, prompt=prompt)
