"""Image preparation and the VAE latent cache (each image and its flip encoded once)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps


def square_resize(img: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Centre-crop to a square, then resize to size x size."""
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), resample)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB image -> float tensor in [-1, 1], shape (3, H, W)."""
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class LatentCache:
    """Posterior mean/std of each image and of its horizontal flip: (N, 2, C, h, w)."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float

    def sample(self, index: torch.Tensor, flip: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = (mean + std * eps) * scaling_factor for each (image, flip) pair."""
        mean = self.mean[index, flip.long()]
        std = self.std[index, flip.long()]
        return (mean + std * eps.to(mean.device)) * self.scaling_factor


@torch.no_grad()
def encode_images(vae, images: list[Image.Image], resolution: int, device: torch.device) -> LatentCache:
    """Encode every image and its mirror once; training then samples from the cached posteriors."""
    pixels = []
    for img in images:
        square = square_resize(img, resolution)
        pixels += [to_tensor(square), to_tensor(ImageOps.mirror(square))]
    batch = torch.stack(pixels).to(device=device, dtype=vae.dtype)
    encoded = vae.encode(batch)
    if hasattr(encoded, "latent_dist"):  # KL autoencoder: a Gaussian posterior, sampled every step
        mean, std = encoded.latent_dist.mean, encoded.latent_dist.std
    else:  # VQ autoencoder: deterministic pre-quantisation latents (what a VQ-LDM's UNet is trained on)
        mean = encoded.latents
        std = torch.zeros_like(mean)
    shape = (len(images), 2, *mean.shape[1:])
    return LatentCache(mean.float().reshape(shape), std.float().reshape(shape),
                       float(getattr(vae.config, "scaling_factor", 1.0)))
