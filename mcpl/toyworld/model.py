"""Tiny diffusers components for the toy world, built from configs (no downloads).

Sizes follow an earlier probe on this 2-core machine: a factor-2 VAE (32 px -> 4x16x16),
a 2-level UNet with cross-attention at 16x16, 8x8 and the mid block, and a 2-layer
128-wide CLIP text encoder.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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


class RecordingCrossAttnProcessor:
    """Plain (non-fused) attention that can keep its cross-attention probabilities.

    Training needs them with gradients (grounding loss); evaluation needs them to compare
    word maps with masks. `store` is shared by all layers: when `store["on"]` is true the
    probabilities (batch*heads, queries, keys) are appended under this layer's name.
    """

    def __init__(self, store: dict, name: str) -> None:
        self.store = store
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        seq = hidden_states.shape[1] if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)
        if self.store.get("on"):
            self.store.setdefault("maps", {}).setdefault(self.name, []).append(probs)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_recorders(unet: UNet2DConditionModel, store: dict) -> list[str]:
    """Swap every cross-attention (attn2) processor for a recorder; returns layer names."""
    procs = {}
    names = []
    for key, proc in unet.attn_processors.items():
        if key.endswith("attn2.processor"):
            name = key[: -len(".attn2.processor")]
            procs[key] = RecordingCrossAttnProcessor(store, name)
            names.append(name)
        else:
            procs[key] = proc
    unet.set_attn_processor(procs)
    return names
