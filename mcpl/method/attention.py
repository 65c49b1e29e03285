"""Per-sample cross-attention maps of chosen tokens, and the AttnMask built from them.

A capture processor replaces diffusers' processor on the chosen cross-attention layers. It
computes the same output, and records, for each sample of the batch separately, how much
attention every query position pays to each concept's key positions. Nothing mixes
samples: sample i's map comes from sample i's rows only (the paper's code halved the heads
as if a CFG batch were present and OR-ed every mask with sample 0's).
"""

from __future__ import annotations

import re
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

CROSS_ATTN = re.compile(r"\.attn2\.processor$")


def layer_downscale(name: str, unet: UNet2DConditionModel) -> int:
    """How many times smaller than the latent this layer's attention map is."""
    n_down = len(unet.config.down_block_types)
    if name.startswith("mid_block"):
        return 2 ** (n_down - 1)
    index = int(name.split(".")[1])
    return 2 ** index if name.startswith("down_blocks") else 2 ** (len(unet.config.up_block_types) - 1 - index)


def cross_attention_layers(unet: UNet2DConditionModel) -> list[str]:
    return [n for n in unet.attn_processors if CROSS_ATTN.search(n)]


def select_layers(unet: UNet2DConditionModel, names: list[str] | None = None,
                  downscale: int | None = None) -> list[str]:
    """Cross-attention processors matching name substrings, or at a latent downscale.

    With a downscale the model lacks, the closest available one is used.
    """
    layers = cross_attention_layers(unet)
    if names:
        chosen = [n for n in layers if any(s in n for s in names)]
        if not chosen:
            raise ValueError(f"no cross-attention layer matches {names}; available: {layers}")
        return chosen
    available = sorted({layer_downscale(n, unet) for n in layers})
    target = downscale or 4
    best = min(available, key=lambda d: (abs(d - target), d))
    return [n for n in layers if layer_downscale(n, unet) == best]


class ProbabilityStore(Protocol):
    """What a capture processor reports to: `enabled` (compute explicit probabilities?) and `record`.

    AttentionStore (below) keeps detached per-concept maps for AttnMask and the exported
    maps; the toy world's pretraining keeps the raw probabilities with their gradient.
    """

    enabled: bool

    def record(self, probs: torch.Tensor, heads: int, layer: str) -> None: ...


class AttentionStore:
    """Collects per-sample, per-concept maps from every captured layer call.

    `key_weights[b, c, k]` says how much key position k counts for concept c in sample b
    (1/n over a token's n vectors, 0 elsewhere). `rows` picks which batch rows of a UNet
    call are the samples (the conditional half under classifier-free guidance).
    """

    def __init__(self) -> None:
        self.key_weights: torch.Tensor | None = None
        self.rows: slice = slice(None)
        self.latent_hw: tuple[int, int] = (0, 0)
        self.maps: list[torch.Tensor] = []
        self.enabled = True

    def reset(self) -> None:
        self.maps = []

    def record(self, probs: torch.Tensor, heads: int, layer: str = "") -> None:
        if not self.enabled or self.key_weights is None:
            return
        batch_heads, queries, keys = probs.shape
        per_sample = probs.detach().view(batch_heads // heads, heads, queries, keys).mean(1)[self.rows]
        weights = self.key_weights.to(per_sample.dtype)
        maps = torch.einsum("bqk,bck->bcq", per_sample, weights).float()
        height, width = self.latent_hw
        factor = (height * width / queries) ** 0.5
        h, w = round(height / factor), round(width / factor)
        self.maps.append(maps.reshape(maps.shape[0], maps.shape[1], h, w))

    def aggregate(self) -> torch.Tensor:
        """Mean over recorded calls at the largest recorded resolution: (B, C, h, w)."""
        if not self.maps:
            raise RuntimeError("no attention was recorded; are the capture processors installed?")
        h = max(m.shape[-2] for m in self.maps)
        w = max(m.shape[-1] for m in self.maps)
        resized = [m if m.shape[-2:] == (h, w) else F.interpolate(m, size=(h, w), mode="bilinear",
                                                                  align_corners=False)
                   for m in self.maps]
        return torch.stack(resized).mean(0)


class CaptureProcessor:
    """Cross-attention with explicit probabilities, reported to a store under the layer's name."""

    def __init__(self, store: ProbabilityStore, layer: str = "") -> None:
        self.store = store
        self.layer = layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            b, ch, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, ch, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], context.shape[0])
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        if self.store.enabled:
            probs = attn.get_attention_scores(query, key, mask)
            self.store.record(probs, attn.heads, self.layer)
            out = torch.bmm(probs, value)
        else:  # nothing to record: the fused kernel, same result
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scale)
        out = attn.batch_to_head_dim(out)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(-1, -2).reshape(b, ch, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_capture(unet: UNet2DConditionModel, store: ProbabilityStore, layers: list[str]) -> dict:
    """Put capture processors on `layers`; returns the previous processors for `restore`.

    Each processor reports under its layer's name without the `.processor` suffix
    (e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2`).
    """
    previous = dict(unet.attn_processors)
    unet.set_attn_processor({n: CaptureProcessor(store, n.removesuffix(".processor")) if n in layers else p
                             for n, p in previous.items()})
    return previous


def restore_processors(unet: UNet2DConditionModel, previous: dict) -> None:
    unet.set_attn_processor(previous)


def normalise_maps(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Divide each (sample, concept) map by its spatial max."""
    peak = maps.flatten(-2).amax(-1).clamp_min(eps)
    return maps / peak[..., None, None]


def union_mask(maps: torch.Tensor, threshold: float, size: tuple[int, int]) -> torch.Tensor:
    """AttnMask: (B, C, h, w) maps -> (B, 1, H, W) detached {0, 1} mask.

    Each map is divided by its max, kept where > threshold, OR-ed over concepts and
    nearest-upsampled to the latent size.
    """
    binary = (normalise_maps(maps.detach()) > threshold).any(dim=1, keepdim=True).float()
    return F.interpolate(binary, size=size, mode="nearest")
