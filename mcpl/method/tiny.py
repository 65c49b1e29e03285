"""Tiny random Stable Diffusion models, built in code and saved as real diffusers folders.

Tests, benchmarks and a first demo load them through the same `load_components` path
users take with real models: nothing is mocked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

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
    shutil.rmtree(path, ignore_errors=True)
