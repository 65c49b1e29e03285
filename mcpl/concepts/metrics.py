"""Where does each learned word look? Compare its attention with ground-truth masks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def mask_tensor(mask: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A mask image -> bool (H, W) (white/nonzero = object), optionally resized (nearest)."""
    img = mask.convert("L")
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(img) > 127)


def upsample_map(attention: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) map -> (H, W), bilinear, divided by its max."""
    m = F.interpolate(attention.float()[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return m / m.max().clamp_min(1e-8)


def attention_iou(attention: torch.Tensor, mask: torch.Tensor, threshold: float) -> float:
    """IoU of the thresholded (max-normalised) map with a bool mask of the image's size."""
    pred = upsample_map(attention, tuple(mask.shape)) > threshold
    union = (pred | mask).sum().item()
    return float((pred & mask).sum().item() / union) if union else 0.0


def attention_share(attention: torch.Tensor, mask: torch.Tensor) -> float:
    """Disentanglement: share of a map's attention mass that falls on the mask."""
    m = F.interpolate(attention.float()[None, None], size=tuple(mask.shape), mode="bilinear",
                      align_corners=False)[0, 0].clamp_min(0)
    total = m.sum().item()
    return float(m[mask].sum().item() / total) if total > 0 else 0.0


def concept_metrics(maps: dict[str, torch.Tensor], masks: dict[str, Image.Image],
                    threshold: float) -> dict[str, dict[str, float]]:
    """Per concept with a mask: IoU with its own mask, best IoU with another's, own share."""
    out: dict[str, dict[str, float]] = {}
    for token, attention in maps.items():
        if token not in masks:
            continue
        own = mask_tensor(masks[token])
        others = [mask_tensor(m, tuple(own.shape)) for t, m in masks.items() if t != token]
        out[token] = {
            "iou": attention_iou(attention, own, threshold),
            "iou_other": max((attention_iou(attention, o, threshold) for o in others), default=0.0),
            "share": attention_share(attention, own),
        }
    return out
