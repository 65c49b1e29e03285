"""The two MCPL losses, as pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_noise_loss(prediction: torch.Tensor, target: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of prediction and target, both multiplied by the (detached) mask when given."""
    if mask is not None:
        mask = mask.detach().to(prediction.dtype)
        prediction, target = prediction * mask, target * mask
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def prompt_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, is_anchor: torch.Tensor,
                            temperature: float) -> torch.Tensor:
    """Supervised InfoNCE over encoder features with cosine similarity.

    `features` (N, D) are learned-word features from several prompt views (and, with Bind
    adj, adjective features). Items with the same label are positives of each other, every
    other item is a negative. Only anchor items (learned words) contribute terms; adjective
    items serve as positives/negatives only. Anchors without any positive are skipped.
    """
    z = F.normalize(features.float(), dim=-1)
    logits = z @ z.T / temperature
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~eye
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(eye, 0.0)
    counts = positives.sum(1)
    use = (is_anchor & (counts > 0)).to(z.dtype)
    # A weighted mean instead of boolean indexing: no value is read back from the device.
    per_anchor = -(log_prob * positives).sum(1) / counts.clamp_min(1)
    return (per_anchor * use).sum() / use.sum().clamp_min(1)
