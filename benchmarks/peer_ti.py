"""The peer: diffusers' textual-inversion example loop, re-implemented in plain torch for speed comparisons.

What `examples/textual_inversion/textual_inversion.py` does, as documented and written there
(the facts, with line numbers, are in the research notes this was built from), rewritten here
in our own code so the throughput benchmark can run it on the same frozen modules as mcpl:

setup
  * the placeholder (and `_1`, `_2`... for more vectors) is added to a copy of the tokenizer; the
    initializer must be one token;
  * `resize_token_embeddings(len(tokenizer))` on the text encoder (here with
    `mean_resizing=False`: the new rows are overwritten at once, as the script does);
  * each placeholder row starts as a copy of the initializer's row;
  * everything is frozen except the token-embedding matrix (VAE, UNet, and in the text model
    the encoder layers, the final layer norm and the position embedding);
  * AdamW over the *whole* embedding matrix: lr 1e-4 (the script's default, no `--scale_lr`),
    betas (0.9, 0.999), weight decay 1e-2, eps 1e-8; a constant lr schedule;
  * a copy of the original matrix is kept to restore the frozen rows after each step.

each step (one per optimiser step: no gradient accumulation)
  * the batch is made as the script's dataset does: the image file is opened, resized to the
    training side (bicubic), flipped with p = 0.5, scaled to [-1, 1]; the caption is a random
    template (imagenet_templates_small for objects) around the placeholder, tokenised to the
    tokenizer's full length;
  * the VAE encodes the batch *every step* and samples the posterior: latents =
    latent_dist.sample() * scaling_factor;
  * noise, uniform timesteps over the scheduler's training steps, `add_noise`;
  * the text encoder's last hidden state (gradient through the whole encoder), the UNet
    prediction, fp32 MSE against the noise (or the velocity for v-prediction models);
  * backward, optimiser step, scheduler step, zero_grad; then every non-placeholder row is
    put back from the copy.

Mixed precision as accelerate applies it: the frozen UNet and VAE in `weight_dtype` (the caller
hands them over already cast), the trainable text encoder in fp32 under autocast.

This is the SD 1.x/2.x (one text encoder) script; SDXL's variant is not reproduced here.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# The script's object templates (imagenet_templates_small), in its order.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)


@dataclass
class PeerSettings:
    """The script's knobs that matter for one step (defaults: the script's own)."""

    placeholder: str = "<peer>"
    initializer: str = "object"
    num_vectors: int = 1
    batch_size: int = 4
    resolution: int = 512
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    flip_p: float = 0.5
    templates: Sequence[str] = OBJECT_TEMPLATES
    seed: int = 0


def _text_model(text_encoder):
    """transformers 5: CLIPTextModel is the text transformer itself; WithProjection keeps `.text_model`."""
    return getattr(text_encoder, "text_model", text_encoder)


class TextualInversionPeer:
    """One textual-inversion run of the example script on already loaded frozen modules.

    `text_encoder` is changed while the run lives (a larger table, its rows trainable) and put
    back by `close()`, so one loaded model can serve the peer and mcpl side by side.
    """

    def __init__(self, tokenizer, text_encoder, vae, unet, scheduler, images: Sequence[str | Path],
                 settings: PeerSettings, weight_dtype: torch.dtype = torch.float32) -> None:
        s = self.settings = settings
        self.vae, self.unet, self.scheduler, self.text_encoder = vae, unet, scheduler, text_encoder
        self.images = [Path(p) for p in images]
        self.weight_dtype = weight_dtype
        self.device = next(unet.parameters()).device
        self.random = random.Random(s.seed)  # the dataset's template, image and flip draws
        torch.manual_seed(s.seed)  # the script's set_seed: noise, timesteps, posterior samples
        # --- tokens: the script adds them to its tokenizer; ours is a copy so the caller's stays as it was
        self.tokenizer = copy.deepcopy(tokenizer)
        names = [s.placeholder] + [f"{s.placeholder}_{i}" for i in range(1, s.num_vectors)]
        if self.tokenizer.add_tokens(names) != s.num_vectors:
            raise ValueError(f"the tokenizer already contains {s.placeholder!r}")
        init = self.tokenizer.encode(s.initializer, add_special_tokens=False)
        if len(init) != 1:
            raise ValueError(f"the initializer {s.initializer!r} must be a single token")
        self.ids = self.tokenizer.convert_tokens_to_ids(names)
        self.caption_word = " ".join(names)
        # --- the table: resized, placeholder rows copied from the initializer
        self._original_table = text_encoder.get_input_embeddings()
        # transformers resizes in place (the same module and Parameter get a new tensor): keep the old tensor
        self._original_data = self._original_table.weight.data
        self._original_vocab = text_encoder.config.vocab_size
        self._original_training = text_encoder.training
        text_encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        table = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            for i in self.ids:
                table[i] = table[init[0]].clone()
        # --- what trains: the token-embedding matrix only
        vae.requires_grad_(False)
        unet.requires_grad_(False)
        text = _text_model(text_encoder)
        text.encoder.requires_grad_(False)
        text.final_layer_norm.requires_grad_(False)
        text.embeddings.position_embedding.requires_grad_(False)
        table.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=s.learning_rate,
                                           betas=s.betas, weight_decay=s.weight_decay, eps=s.eps)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)  # "constant"
        text_encoder.train()
        self.frozen_rows = torch.ones(len(self.tokenizer), dtype=torch.bool)
        self.frozen_rows[min(self.ids): max(self.ids) + 1] = False  # the script's contiguous slice
        self.original_rows = table.detach().clone()
        self.autocast = (torch.autocast(self.device.type, dtype=weight_dtype) if weight_dtype != torch.float32
                         else contextlib.nullcontext())
        self.step = 0

    # ------------------------------------------------------------------------ the dataset
    def _example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample as the script's dataset makes it: pixels in [-1, 1] and caption ids."""
        s = self.settings
        image = Image.open(self.images[i % len(self.images)])
        if image.mode != "RGB":
            image = image.convert("RGB")
        caption = self.random.choice(list(s.templates)).format(self.caption_word)
        ids = self.tokenizer(caption, padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids[0]
        image = image.resize((s.resolution, s.resolution), resample=Image.Resampling.BICUBIC)
        if self.random.random() < s.flip_p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = (np.asarray(image).astype(np.uint8) / 127.5 - 1.0).astype(np.float32)
        return torch.from_numpy(pixels).permute(2, 0, 1), ids

    def batch(self) -> dict[str, torch.Tensor]:
        examples = [self._example(self.random.randrange(len(self.images))) for _ in range(self.settings.batch_size)]
        return {"pixel_values": torch.stack([e[0] for e in examples]).to(self.device),
                "input_ids": torch.stack([e[1] for e in examples]).to(self.device)}

    # ------------------------------------------------------------------------------ a step
    def train_step(self) -> torch.Tensor:
        batch = self.batch()
        vae, unet, scheduler = self.vae, self.unet, self.scheduler
        latents = vae.encode(batch["pixel_values"].to(dtype=self.weight_dtype)).latent_dist.sample().detach()
        latents = latents * vae.config.scaling_factor
        size = latents.shape[0]
        noise = torch.randn_like(latents)  # drawn where the latents are, from the global generator
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (size,), device=latents.device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with self.autocast:
            hidden = self.text_encoder(batch["input_ids"])[0].float()
        prediction = unet(noisy, timesteps, hidden.to(dtype=self.weight_dtype)).sample
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unknown prediction type {kind!r}")
        loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
        loss.backward()
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad()
        with torch.no_grad():  # every row but the placeholders' back to where it was
            table = self.text_encoder.get_input_embeddings().weight
            table[self.frozen_rows] = self.original_rows[self.frozen_rows]
        self.step += 1
        return loss.detach()

    def train(self, steps: int) -> dict[str, torch.Tensor]:
        for _ in range(steps):
            self.train_step()
        return self.learned()

    def learned(self) -> dict[str, torch.Tensor]:
        """What the script saves: {placeholder: rows[min(ids):max(ids)+1]}."""
        table = self.text_encoder.get_input_embeddings().weight
        return {self.settings.placeholder: table[min(self.ids): max(self.ids) + 1].detach().float().cpu().clone()}

    def close(self) -> None:
        """Hand the text encoder back as it came: its own table, frozen, in its old mode."""
        self.optimizer.zero_grad(set_to_none=True)
        self._original_table.weight = torch.nn.Parameter(self._original_data, requires_grad=False)
        self._original_table.num_embeddings = self._original_data.shape[0]
        self.text_encoder.set_input_embeddings(self._original_table)
        self.text_encoder.config.vocab_size = self._original_vocab
        self.text_encoder.requires_grad_(False)
        self.text_encoder.train(self._original_training)
