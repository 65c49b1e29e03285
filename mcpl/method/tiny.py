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
                     cross_attention_dim: int = 32, prediction_type: str = "epsilon") -> Path:
    """Random tiny SD components (~1 M params) saved as a StableDiffusionPipeline folder.

    `prediction_type="v_prediction"` makes it SD 2.x-v shaped (the scheduler says so).
    """
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
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False,
                              prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    _remove_tree(out_dir / "_tokenizer_build")
    return out_dir


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0, widths: tuple[int, int] = (32, 64),
                    time_dim: int = 8) -> Path:
    """Random tiny SDXL (two CLIP encoders, text_time conditioning) saved as a StableDiffusionXLPipeline folder.

    Shaped like the real one: text_encoder_2 has a projection (pooled `text_embeds`),
    tokenizer_2 pads with "!", the UNet's cross-attention width is the two widths together
    and its add-embedding takes projection + 6 time ids.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(out_dir / "_tokenizer_build")
    tokenizer_2 = CLIPTokenizer.from_pretrained(out_dir / "_tokenizer_build", pad_token="!")
    common = dict(vocab_size=len(tokenizer), intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=tokenizer.model_max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=widths[0], **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=widths[1], projection_dim=widths[1],
                                                     hidden_act="gelu", **common))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=sum(widths), addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=widths[1] + 6 * time_dim, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(out_dir)
    _remove_tree(out_dir / "_tokenizer_build")
    return out_dir


def build_tiny_bert_tokenizer(out_dir: Path, words: tuple[str, ...] | list[str] = TINY_WORDS):
    """A BERT WordPiece tokenizer over a small word list plus characters and ##characters."""
    from transformers import BertTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *chars, *".,!?'-<>_|", *("##" + c for c in chars)]
    (out_dir / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")  # a duplicate line shifts ids
    return BertTokenizer.from_pretrained(out_dir, model_max_length=77)


def build_tiny_ldm(out_dir: str | Path, seed: int = 0, width: int = 32, vq: bool = False) -> Path:
    """Random tiny LDM text-to-image model (BERT tokenizer, LDMBert, UNet, KL autoencoder, or a VQ one with
    `vq`) saved as an LDMTextToImagePipeline folder. The autoencoder downsamples 8x, as the pipeline assumes
    (latents = size // 8)."""
    from diffusers import DDIMScheduler, LDMTextToImagePipeline, VQModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_tiny_bert_tokenizer(out_dir / "_tokenizer_build")
    bert = LDMBertModel(LDMBertConfig(vocab_size=len(tokenizer), max_position_embeddings=77, encoder_layers=2,
                                      encoder_ffn_dim=64, encoder_attention_heads=2, head_dim=16, d_model=width))
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width, attention_head_dim=8, norm_num_groups=8)
    shape = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 norm_num_groups=4, layers_per_block=1, sample_size=32)
    vae = VQModel(**shape, num_vq_embeddings=64, vq_embed_dim=4) if vq else AutoencoderKL(**shape)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, num_train_timesteps=1000)
    LDMTextToImagePipeline(vqvae=vae, bert=bert, tokenizer=tokenizer, unet=unet, scheduler=scheduler).save_pretrained(
        out_dir)
    _remove_tree(out_dir / "_tokenizer_build")
    return out_dir


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
