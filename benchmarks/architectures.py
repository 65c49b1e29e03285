"""Real models' architectures with random weights, for speed figures (no weights can be downloaded here).

Speed does not depend on the weights, so a UNet / text encoder / VAE built from the published
configs measures what the real model would. Each builder returns mcpl `Components` of the
right family, so the trainer runs on them exactly as on a loaded folder.

    sd15       Stable Diffusion 1.5: UNet 860 M, CLIP ViT-L 123 M, factor-8 VAE
    sdxl       SDXL base 1.0: UNet 2.6 B (transformer depth 1/2/10), CLIP ViT-L + OpenCLIP bigG, text_time
    ldm256     CompVis ldm-text2im-large-256 (the MCPL paper's): UNet 872 M, LDMBert 32x1280
    tiny       the project's tiny test SD model (a real folder)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from mcpl.method.families import FAMILIES, Components, TextStack
from mcpl.method.tiny import build_tiny_bert_tokenizer, build_tiny_model, build_tiny_tokenizer

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def _vae(sample_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=sample_size)


def _tokenizer(pad: str | None = None):
    folder = Path(tempfile.mkdtemp()) / "tok"
    tokenizer = build_tiny_tokenizer(folder, max_length=77)  # a small vocabulary: its size does not change speed
    if pad:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(folder, pad_token=pad)
    return tokenizer


def _components(name: str, family: str, stacks: list[TextStack], unet, vae, device, dtype) -> Components:
    for module in (*(s.encoder for s in stacks), unet, vae):
        module.requires_grad_(False).eval().to(device=device, dtype=dtype)
    return Components(name, FAMILIES[family], stacks, unet, vae, _scheduler(), torch.device(device), dtype, {})


def sd15(device="cpu", dtype=torch.float32, resolution: int = 512) -> Components:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                           **CLIP_L))
    unet = UNet2DConditionModel(sample_size=resolution // 8, cross_attention_dim=768)
    return _components("sd15-architecture-random", "sd", [TextStack("text_encoder", tokenizer, encoder)], unet,
                       _vae(resolution), device, dtype)


def sdxl(device="cpu", dtype=torch.float32, resolution: int = 1024) -> Components:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok1, tok2 = _tokenizer(), _tokenizer(pad="!")
    ids = dict(vocab_size=len(tok1), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    te1 = CLIPTextModel(CLIPTextConfig(**ids, **CLIP_L))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **CLIP_G))
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)
    stacks = [TextStack("text_encoder", tok1, te1, "clip_l", ""),
              TextStack("text_encoder_2", tok2, te2, "clip_g", "_2")]
    return _components("sdxl-architecture-random", "sdxl", stacks, unet, _vae(resolution), device, dtype)


def ldm256(device="cpu", dtype=torch.float32, resolution: int = 256) -> Components:
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    torch.manual_seed(0)
    tokenizer = build_tiny_bert_tokenizer(Path(tempfile.mkdtemp()) / "bert")
    bert = LDMBertModel(LDMBertConfig(vocab_size=len(tokenizer), max_position_embeddings=77, encoder_layers=32,
                                      encoder_ffn_dim=5120, encoder_attention_heads=8, head_dim=64, d_model=1280))
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8, cross_attention_dim=1280)
    return _components("ldm256-architecture-random", "ldm", [TextStack("bert", tokenizer, bert, max_length=77)],
                       unet, _vae(resolution), device, dtype)


def tiny(device="cpu", dtype=torch.float32, resolution: int = 16) -> Components:
    from mcpl.method.models import load_components

    return load_components(str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")), device, dtype)


BUILDERS = {"tiny": tiny, "sd15": sd15, "sdxl": sdxl, "ldm256": ldm256}
