"""The paper's own model family: LDM text-to-image (`LDMTextToImagePipeline` folders, e.g.
CompVis/ldm-text2im-large-256): a BERT tokenizer, the LDMBert text encoder, 256 px.

LDMBert attends in both directions, so a later token changes earlier positions' features:
the "encode PromptCL views only up to the longest prompt" shortcut, exact for causal CLIP,
is off here (`causal_text = False`). Conditioning is LDMBert's last hidden state over the
prompt padded to 77 tokens, as the pipeline encodes it. diffusers' textual-inversion loader
does not cover this pipeline, so concepts are added to its tokenizer and table by mcpl; the
file layout is diffusers' single-key one (`{token: [n, 1280]}`).
"""

from __future__ import annotations

import torch

from mcpl.errors import SentenceError
from mcpl.method.families.base import Conditioning, Family, TextStack, weights_policy

PROMPT_TOKENS = 77  # LDMTextToImagePipeline pads every prompt to 77


class LatentDiffusion(Family):
    name = "ldm"
    pipeline_classes = ("LDMTextToImagePipeline",)
    description = "LDM text-to-image, the MCPL paper's model (LDMTextToImagePipeline)"
    vae_subfolder = "vqvae"
    causal_text = False

    def text_subfolders(self) -> tuple[str, ...]:
        return ("tokenizer", "bert")

    def load_stacks(self, model: str, dtype: torch.dtype) -> list[TextStack]:
        from diffusers.pipelines.latent_diffusion import LDMBertModel
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
        bert = LDMBertModel.from_pretrained(model, subfolder="bert", dtype=dtype,
                                            use_safetensors=weights_policy(model, "bert"))
        return [TextStack("bert", tokenizer, bert, max_length=PROMPT_TOKENS)]

    @staticmethod
    def check_tokens(tokens: list[str]) -> None:
        upper = [t for t in tokens if t != t.lower()]
        if upper:
            raise SentenceError(f"placeholder(s) {', '.join(upper)}: LDM's BERT tokenizer lowercases every prompt; "
                                "name placeholders in lowercase")

    def condition(self, stacks: list[TextStack], ids: list[torch.Tensor],
                  sizes: torch.Tensor | None = None) -> Conditioning:
        bert = stacks[0].encoder
        return Conditioning(bert(ids[0].to(bert.device))[0])

    def pipeline(self, model: str, device: torch.device, dtype: torch.dtype):
        from diffusers import DDIMScheduler, LDMTextToImagePipeline

        pipe = LDMTextToImagePipeline.from_pretrained(model, dtype=dtype, use_safetensors=weights_policy(model, "unet"))
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.tokenizer.model_max_length = PROMPT_TOKENS
        pipe.mcpl_vectors = {}  # token -> its vector tokens (tok, tok_1, ...), for expand_prompt
        return pipe

    def pipeline_from(self, c):
        import copy

        from diffusers import DDIMScheduler, LDMTextToImagePipeline

        pipe = LDMTextToImagePipeline(vqvae=c.vae, bert=c.stacks[0].encoder,
                                      tokenizer=copy.deepcopy(c.stacks[0].tokenizer), unet=c.unet,
                                      scheduler=DDIMScheduler.from_pretrained(c.name, subfolder="scheduler"))
        pipe.tokenizer.model_max_length = PROMPT_TOKENS
        pipe.mcpl_vectors = {}
        return pipe

    def pipeline_stacks(self, pipe) -> list[TextStack]:
        return [TextStack("bert", pipe.tokenizer, pipe.bert, max_length=PROMPT_TOKENS)]

    def add_rows(self, pipe, token: str, vectors: list[torch.Tensor]) -> None:
        """Add the token's vector tokens to the tokenizer and their rows to LDMBert's table."""
        self.check_tokens([token])
        rows = vectors[0]
        strings = [token] + [f"{token}_{i}" for i in range(1, rows.shape[0])]
        vocab = pipe.tokenizer.get_vocab()
        if any(s in vocab for s in strings):
            raise SentenceError(f"token {token} is already in the tokenizer's vocabulary")
        table = pipe.bert.get_input_embeddings()
        if rows.shape[-1] != table.weight.shape[-1]:
            raise SentenceError(f"{token} has width {rows.shape[-1]} but LDMBert's table is {table.weight.shape[-1]}")
        pipe.tokenizer.add_tokens(strings)
        pipe.bert.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
        ids = pipe.tokenizer.convert_tokens_to_ids(strings)
        with torch.no_grad():
            pipe.bert.get_input_embeddings().weight[ids] = rows.to(table.weight.dtype).to(table.weight.device)
        pipe.mcpl_vectors[token] = strings

    def expand_prompt(self, pipe, prompt: str) -> str:
        for token, strings in getattr(pipe, "mcpl_vectors", {}).items():
            prompt = prompt.replace(token, " ".join(strings))
        return prompt

    def sample(self, pipe, prompt: str, num_images: int, steps: int, guidance: float, generator, size: int) -> list:
        return pipe([self.expand_prompt(pipe, prompt)] * num_images, height=size, width=size,
                    num_inference_steps=steps, guidance_scale=guidance, generator=generator).images
