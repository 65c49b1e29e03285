"""Tiny diffusers components for the toy world, built from configs (no downloads).

Sizes follow an earlier probe on this 2-core machine: a factor-2 VAE (32 px -> 4x16x16),
a 2-level UNet with cross-attention at 16x16, 8x8 and the mid block, and a 2-layer
128-wide CLIP text encoder.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from mcpl.method.attention import cross_attention_layers, install_capture

TEXT_DIM = 128
IMAGE_SIZE = 32
LATENT_SIZE = 16


def build_vae() -> AutoencoderKL:
    """32x32x3 <-> 4x16x16 autoencoder (two blocks = one downsampling)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
    )


def build_unet() -> UNet2DConditionModel:
    """~4 M-param UNet; `attention_head_dim=4` is diffusers' legacy name for 4 heads."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """2-layer CLIP text transformer sized to the tokenizer."""
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=TEXT_DIM * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=TEXT_DIM,
    )
    return CLIPTextModel(cfg)


def build_train_scheduler() -> DDPMScheduler:
    """SD-style scaled-linear schedule, epsilon prediction."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def build_sample_scheduler() -> DDIMScheduler:
    """DDIM with the training schedule; saved with the pipeline."""
    return DDIMScheduler.from_config(build_train_scheduler().config, set_alpha_to_one=False)


class RawAttention:
    """A `mcpl.method.attention.ProbabilityStore` that keeps raw cross-attention probabilities.

    `maps[layer]` lists every recorded call's probabilities, shape (batch*heads, queries,
    keys), undetached: pretraining's grounding loss backpropagates through them, and the
    gates average them into word maps. While `enabled` is false the capture processors use
    the fused attention kernel and record nothing.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.maps: dict[str, list[torch.Tensor]] = {}
        self.heads: dict[str, int] = {}

    def record(self, probs: torch.Tensor, heads: int, layer: str) -> None:
        self.maps.setdefault(layer, []).append(probs)
        self.heads[layer] = heads

    def clear(self) -> None:
        self.maps = {}


def install_raw_capture(unet: UNet2DConditionModel, store: RawAttention) -> list[str]:
    """Capture every cross-attention layer of `unet` into `store`; returns the layer names."""
    layers = cross_attention_layers(unet)
    install_capture(unet, store, layers)
    return [n.removesuffix(".processor") for n in layers]
