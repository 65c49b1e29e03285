"""Generate with learned concepts through a stock diffusers pipeline of the model's family.

SD and SDXL concepts are loaded with diffusers' own `load_textual_inversion` (SDXL: into
both encoders), so what works here works in any diffusers program; LDM concepts are added
by the family adapter (diffusers has no loader for that pipeline). A concept trained on
another family or width is refused before anything is loaded. Attention of each concept
is recorded over the whole sampling trajectory (conditional half of the CFG batch only)
and averaged.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from mcpl.concepts.embeddings import ConceptFiles, load_concept_files
from mcpl.errors import ModelLoadError, RegistryError
from mcpl.method.attention import AttentionStore, install_capture, restore_processors, select_layers
from mcpl.method.families import Components, family_of
from mcpl.method.model_files import model_hash
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


def load_pipeline(model: str, device: str | None = None):
    """The family's sampling pipeline (DDIM scheduler), frozen parts in the device's dtype."""
    dev = pick_device(device)
    family = family_of(model)
    try:
        pipe = family.pipeline(model, dev, frozen_dtype(dev))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model {model!r} as a {family.description} pipeline: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    pipe.mcpl_family = family
    pipe.mcpl_model = model
    return pipe.to(dev)


@contextmanager
def borrowed_pipeline(components: Components) -> Iterator:
    """A sampling pipeline on a job's already loaded model; loading concepts into it grows the shared
    encoders' tables, so each encoder's original table (and vocabulary size) is put back after."""
    family = components.family
    # transformers resizes a table in place (same module, new weight data), so the weights are kept too
    saved = [(s.encoder, s.encoder.get_input_embeddings(), s.encoder.get_input_embeddings().weight.data,
              s.encoder.config.vocab_size) for s in components.stacks]
    pipe = family.pipeline_from(components)
    pipe.set_progress_bar_config(disable=True)
    pipe.mcpl_family, pipe.mcpl_model = family, components.name
    try:
        yield pipe
    finally:
        for encoder, table, weights, vocab in saved:
            encoder.set_input_embeddings(table)
            table.weight.data, table.num_embeddings = weights, weights.shape[0]
            encoder.config.vocab_size = vocab


def check_compatible(pipe, concept: ConceptFiles, source: str) -> None:
    """Refuse a concept of another family or width (diffusers would fail deep inside); warn on
    another base model of the same family (the words may mean little there)."""
    family = pipe.mcpl_family
    if concept.family != family.name:
        raise RegistryError(f"{source}: {concept.token} was learned on a {concept.family} model; this is a "
                            f"{family.name} model ({family.description}); load it into a {concept.family} model")
    widths = [s.width for s in family.pipeline_stacks(pipe)]
    if concept.widths != widths:
        raise RegistryError(f"{source}: {concept.token} has embedding widths {concept.widths} but this model's "
                            f"text encoders take {widths}; it was learned on another model")
    trained_on = concept.fact("base_model_hash")
    if trained_on and trained_on != model_hash(pipe.mcpl_model):
        warnings.warn(f"{concept.token} was learned on another {family.name} model ({concept.fact('base_model')}); "
                      "it may not mean the same thing here", stacklevel=3)


@contextmanager
def _quiet_resize() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_concepts(pipe, files: list[str | Path], tokens: list[str] | None = None) -> list[str]:
    """Load concept files; `tokens` renames them (two files that both learned <dog>)."""
    loaded = []
    vocab = pipe.tokenizer.get_vocab()
    for i, file in enumerate(files):
        concept = load_concept_files(file)
        check_compatible(pipe, concept, str(file))
        token = tokens[i] if tokens else concept.token
        if token in vocab or token in loaded:
            raise RegistryError(f"token {token} is already loaded; give one of the concepts another token")
        with _quiet_resize():  # the rows are overwritten at once: transformers' resize notice is noise
            pipe.mcpl_family.add_rows(pipe, token, concept.vectors)
        loaded.append(token)
    return loaded


def concept_key_weights(pipe, prompt: str, tokens: list[str]) -> torch.Tensor:
    """(C, L): 1/n at each of a token's n vector positions in the tokenised prompt."""
    tokenizer = pipe.tokenizer
    converted = pipe.mcpl_family.expand_prompt(pipe, prompt)
    ids = tokenizer(converted, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids[0]
    vocab = tokenizer.get_vocab()
    weights = torch.zeros(len(tokens), ids.shape[0])
    for c, token in enumerate(tokens):
        family = [vocab[t] for t in vocab if t == token or t.startswith(token + "_")]
        hits = torch.isin(ids, torch.tensor(family)).float()
        weights[c] = hits / hits.sum().clamp_min(1)
    return weights


@torch.no_grad()
def generate(pipe, prompt: str, tokens: list[str], num_images: int = 4, steps: int = 25, guidance: float = 5.0,
             seed: int = 0, size: int | None = None, attention_downscale: int | None = None) -> Generation:
    """Sample `num_images` images of `prompt`; record each token's attention along the way."""
    family = pipe.mcpl_family
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if hasattr(pipe, "vae") \
        else 2 ** (len(pipe.vqvae.config.block_out_channels) - 1)
    size = size or int(pipe.unet.config.sample_size) * vae_factor
    store = AttentionStore()
    weights = concept_key_weights(pipe, prompt, tokens)
    store.key_weights = weights[None].expand(num_images, -1, -1)
    cfg = guidance > 1.0
    store.rows = slice(num_images, 2 * num_images) if cfg else slice(None)
    store.latent_hw = (size // vae_factor, size // vae_factor)
    layers = select_layers(pipe.unet, None, attention_downscale or family.default_attention_downscale)
    previous = install_capture(pipe.unet, store, layers)
    try:
        generator = torch.Generator("cpu").manual_seed(seed)
        images = family.sample(pipe, prompt, num_images, steps, guidance, generator, size)
    finally:
        restore_processors(pipe.unet, previous)
    mean = store.aggregate() if tokens else torch.zeros(num_images, 0, 1, 1)
    maps = [{t: mean[i, c].cpu() for c, t in enumerate(tokens)} for i in range(num_images)]
    return Generation(images=images, maps=maps, prompt=prompt)


def prompt_warnings(pipe, prompt: str, tokens: list[str]) -> list[str]:
    """What to tell a person before sampling `prompt` with the loaded `tokens`: that it uses none of
    them (the images would not show the concepts), or that it is longer than the text encoder reads
    (the rest is cut off, and which loaded tokens fall in the cut part)."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(pipe.mcpl_family.expand_prompt(pipe, prompt), truncation=False, verbose=False).input_ids
    vocab = tokenizer.get_vocab()
    position = {t: [i for i, x in enumerate(ids) if x in {vocab[v] for v in vocab if v == t or
                                                            v.startswith(t + "_")}] for t in tokens}
    warnings_ = []
    if tokens and not any(position.values()):
        warnings_.append(f"the prompt uses none of the loaded tokens ({', '.join(tokens)}); the images will "
                         "not show the concepts. Write them into --prompt, e.g. \"a photo of "
                         f"{tokens[0]}\"")
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        cut = [t for t, where in position.items() if where and max(where) >= limit - 1]
        warnings_.append(f"the prompt is {len(ids)} tokens long but this model's text encoder reads {limit} "
                         f"(start and end included): everything after token {limit - 2} is cut off"
                         + (f", including {', '.join(cut)}" if cut else ""))
    return warnings_
