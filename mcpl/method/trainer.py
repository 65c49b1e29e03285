"""One MCPL job: learn new token embeddings from one image (or a diverse group).

Frozen: tokenizer, text encoder, UNet, VAE. Trained: `LearnedTokenEmbedding.rows` only.
Each step: sample cached latents, noise them, predict with the UNet while recording the
learned words' cross-attention per sample, optionally mask the loss by those maps
(AttnMask) and add InfoNCE between the learned words' encoder features (PromptCL, Bind adj).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from mcpl.config import TrainConfig
from mcpl.method.attention import AttentionStore, install_capture, restore_processors, select_layers, union_mask
from mcpl.method.checkpoint import load_latest, save_checkpoint
from mcpl.method.images import LatentCache, encode_images
from mcpl.method.inputs import JobInput, image_hash
from mcpl.method.learned import LearnedTokenEmbedding, attach_learned_tokens, frozen_table, token_vectors
from mcpl.method.losses import masked_noise_loss, prompt_contrastive_loss
from mcpl.method.models import Components
from mcpl.method.prompts import TEMPLATES, PromptPlan, SentenceError, plan_prompts


class TrainCallback(Protocol):
    """Observe training without the engine knowing who listens (progress, MLflow, Prefect)."""

    def on_step(self, step: int, logs: dict[str, float]) -> None: ...

    def on_checkpoint(self, step: int, path: Path) -> None: ...


@dataclass
class TextBatch:
    """Tokenised prompts and where each concept (and its adjective) sits in them."""

    ids: torch.Tensor  # (N, L)
    concept_weights: torch.Tensor  # (N, C, L): 1/n at a concept's n vector positions
    adjective_weights: torch.Tensor  # (N, C, L): 1/m at its adjective's m positions


def default_learning_rate(components: Components, batch_size: int) -> float:
    """Scale with the token-embedding norm: tiny models need larger steps per unit of norm."""
    if "learning_rate" in components.hints:
        return float(components.hints["learning_rate"])
    norm = frozen_table(components.text_encoder).float().norm(dim=-1).mean().item()
    return 1.3e-3 * batch_size * norm


class MCPLTrainer:
    """Holds one job's state; `train()` runs (or resumes) it to `config.steps`."""

    def __init__(self, components: Components, inputs: Sequence[JobInput], config: TrainConfig,
                 checkpoint_dir: str | Path | None = None, callbacks: Sequence[TrainCallback] = (),
                 progress: bool = True) -> None:
        if not inputs:
            raise ValueError("a job needs at least one image")
        # The job's own tokenizer copy: the caller's components stay reusable after close().
        self.c = dataclasses.replace(components, tokenizer=copy.deepcopy(components.tokenizer))
        self.inputs = list(inputs)
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.callbacks = list(callbacks)
        self.progress = progress
        self.plan: PromptPlan = plan_prompts([i.sentence for i in inputs], config.strategy,
                                             config.num_vectors, config.use_templates,
                                             components.hints.get("templates", TEMPLATES))
        self.embedding: LearnedTokenEmbedding = attach_learned_tokens(self.c, self.plan)
        self.labels = self.plan.labels
        self._prompt_cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}
        self.plan.templates = self._fitting_templates()
        self.token_ids = [self.c.tokenizer.convert_tokens_to_ids(self.plan.token_strings(t))
                          for t in self.plan.tokens]
        self.resolution = config.resolution or components.default_resolution
        self.latents: LatentCache = encode_images(components.vae, [i.image for i in inputs],
                                                  self.resolution, components.device)
        self.latent_hw = tuple(self.latents.mean.shape[-2:])
        self.layers = select_layers(components.unet, config.attention_layers,
                                    config.attention_downscale or components.hints.get("attention_downscale"))
        self.store = AttentionStore()
        self.store.latent_hw = self.latent_hw
        self._previous_processors = install_capture(components.unet, self.store, self.layers)
        self.lr = config.learning_rate or default_learning_rate(components, config.batch_size)
        self.optimizer = torch.optim.AdamW([self.embedding.rows], lr=self.lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.running_maps: torch.Tensor | None = None  # (n_images, C, h, w), unflipped coords
        self.running_count = torch.zeros(len(inputs))
        self.history: list[dict[str, float]] = []
        self.train_seconds = 0.0

    # ----------------------------------------------------------------------------- text
    def _fitting_templates(self) -> list[str]:
        """Templates whose prompts fit the tokenizer's length for every image."""
        limit = self.c.tokenizer.model_max_length
        fits = [t for t in self.plan.templates
                if all(len(self.c.tokenizer(self.plan.prompt(i, t), verbose=False).input_ids) <= limit
                       for i in range(len(self.inputs)))]
        if not fits:
            raise SentenceError(f"the sentence is longer than the model's {limit} tokens: "
                                f"{self.plan.prompt(0, '{}')!r}")
        return fits

    def encode_prompts(self, image_index: Sequence[int], templates: Sequence[str],
                       full_length: bool = True) -> TextBatch:
        """Tokenised prompts with concept/adjective positions, from a per-(image, template) cache.

        The UNet needs full-length conditioning; PromptCL-only views stop at the longest
        prompt, since CLIP's causal encoder gives earlier positions the same features
        whatever padding follows (that keeps PromptCL cheap).
        """
        rows = [self._prompt_row(i, t) for i, t in zip(image_index, templates, strict=True)]
        length = self.c.tokenizer.model_max_length if full_length else max(r[3] for r in rows)
        return TextBatch(*(torch.stack([r[k][..., :length] for r in rows]) for k in range(3)))

    def _prompt_row(self, image: int, template: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(ids (L,), concept weights (C, L), adjective weights (C, L), used length) of one prompt."""
        key = (image, template)
        if key not in self._prompt_cache:
            encoded = self.c.tokenizer(self.plan.prompt(image, template), padding="max_length",
                                       max_length=self.c.tokenizer.model_max_length, truncation=True,
                                       return_tensors="pt")
            ids = encoded.input_ids[0]
            concept_w = torch.zeros(len(self.labels), ids.shape[0])
            adjective_w = torch.zeros_like(concept_w)
            for c, token_ids in enumerate(self.token_ids):
                hits = torch.isin(ids, torch.tensor(token_ids)).float()
                concept_w[c] = hits / hits.sum().clamp_min(1)
            if self.config.bind_adj:
                for label, entry in self.plan.adjectives(image).items():
                    span = self._find(ids.tolist(), self._entry_ids(entry))
                    if span:
                        adjective_w[self.labels.index(label), span[0]:span[1]] = 1.0 / (span[1] - span[0])
            self._prompt_cache[key] = (ids, concept_w, adjective_w, int(encoded.attention_mask.sum()))
        return self._prompt_cache[key]

    def _entry_ids(self, entry: str) -> list[int]:
        strings = next((self.plan.token_strings(t) for t in self.plan.tokens if t.token == entry), None)
        if strings:
            return self.c.tokenizer.convert_tokens_to_ids(strings)
        return self.c.tokenizer(entry, add_special_tokens=False).input_ids

    @staticmethod
    def _find(sequence: list[int], pattern: list[int]) -> tuple[int, int] | None:
        for start in range(len(sequence) - len(pattern) + 1):
            if sequence[start:start + len(pattern)] == pattern:
                return start, start + len(pattern)
        return None

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.c.text_encoder(ids.to(self.c.device))[0]

    # ---------------------------------------------------------------------------- model
    def predict_with_maps(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                          concept_weights: torch.Tensor,
                          record: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """UNet prediction and per-sample concept maps (B, C, h, w) from the same pass
        (None while recording is off: then the capture layers run the fused kernel)."""
        self.store.reset()
        self.store.enabled = record
        self.store.key_weights = concept_weights.to(self.c.device)
        self.store.rows = slice(None)
        self.store.latent_hw = tuple(noisy.shape[-2:])
        prediction = self.c.unet(noisy.to(self.c.dtype), timesteps.to(self.c.device),
                                 encoder_hidden_states=text.to(self.c.dtype)).sample
        return prediction, self.store.aggregate() if record else None

    def _target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        kind = self.c.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.c.scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction type {kind!r}")

    def _mask(self, maps: torch.Tensor, index: torch.Tensor, flip: torch.Tensor) -> torch.Tensor | None:
        cfg = self.config
        if not cfg.attn_mask or self.step < cfg.mask_warmup_steps:
            return None
        if cfg.mask_source == "running":
            maps = self._update_running(maps, index, flip)
        return union_mask(maps, cfg.mask_threshold, self.latent_hw)

    def _update_running(self, maps: torch.Tensor, index: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Running mean of each image's maps over training steps (paper text: mean over t)."""
        maps = maps.detach().float().cpu()
        unflipped = torch.where(flip[:, None, None, None], maps.flip(-1), maps)
        if self.running_maps is None:
            self.running_maps = torch.zeros(len(self.inputs), *maps.shape[1:])
        for b, i in enumerate(index.tolist()):
            self.running_count[i] += 1
            self.running_maps[i] += (unflipped[b] - self.running_maps[i]) / self.running_count[i]
        current = self.running_maps[index]
        return torch.where(flip[:, None, None, None], current.flip(-1), current).to(self.c.device)

    # ----------------------------------------------------------------------------- step
    def train_step(self) -> dict[str, float]:
        cfg, g, device = self.config, self.generator, self.c.device
        batch = cfg.batch_size
        views = cfg.cl_views if cfg.prompt_cl else 1
        index = torch.randint(len(self.inputs), (batch,), generator=g)
        flip = torch.rand(batch, generator=g) < cfg.flip_p
        n_templates = len(self.plan.templates)
        picks = [torch.randperm(n_templates, generator=g)[:views] if n_templates >= views
                 else torch.randint(n_templates, (views,), generator=g) for _ in range(batch)]
        eps = torch.randn(batch, *self.latents.mean.shape[2:], generator=g)
        noise = torch.randn(batch, *self.latents.mean.shape[2:], generator=g)
        timesteps = torch.randint(0, self.c.scheduler.config.num_train_timesteps, (batch,), generator=g)

        latents = self.latents.sample(index.to(device), flip.to(device), eps)
        noise, timesteps = noise.to(device), timesteps.to(device)
        noisy = self.c.scheduler.add_noise(latents, noise, timesteps)
        images = [int(i) for i in index]
        text = self.encode_prompts(images, [self.plan.templates[int(p[0])] for p in picks])
        hidden = self.encode_text(text.ids)
        prediction, maps = self.predict_with_maps(noisy, timesteps, hidden, text.concept_weights,
                                                  record=cfg.attn_mask)
        mask = self._mask(maps, index, flip) if maps is not None else None
        noise_loss = masked_noise_loss(prediction, self._target(latents, noise, timesteps), mask)
        loss = noise_loss
        logs = {"noise_loss": float(noise_loss.detach())}
        if cfg.prompt_cl:
            extra = self.encode_prompts(images * (views - 1), [self.plan.templates[int(p[v])]
                                                               for v in range(1, views) for p in picks],
                                        full_length=False)
            cl = self.contrastive_loss([(hidden, text), (self.encode_text(extra.ids), extra)])
            loss = loss + cfg.cl_weight * cl
            logs["cl_loss"] = float(cl.detach())
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * min(1.0, (self.step + 1) / max(1, cfg.lr_warmup_steps))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        logs.update(loss=float(loss.detach()), lr=self.optimizer.param_groups[0]["lr"],
                    mask_fraction=float(mask.mean()) if mask is not None else 1.0)
        return logs

    def contrastive_loss(self, views: Sequence[tuple[torch.Tensor, TextBatch]]) -> torch.Tensor:
        """PromptCL over all prompt views; Bind adj adds each concept's adjective as a positive.

        `views` pairs encoder outputs (N, L, D) with their TextBatch; items are pooled over all.
        """
        items, labels, anchors = [], [], []
        kinds = [("concept", True)] + ([("adjective", False)] if self.config.bind_adj else [])
        for hidden, text in views:
            for kind, is_anchor in kinds:
                weights = text.concept_weights if kind == "concept" else text.adjective_weights
                present = weights.sum(-1) > 0  # (N, C)
                if not bool(present.any()):
                    continue
                features = torch.einsum("ncl,nld->ncd", weights.to(hidden.device, hidden.dtype), hidden)
                items.append(features[present.to(hidden.device)])
                labels.append(present.nonzero()[:, 1])
                anchors.append(torch.full((int(present.sum()),), is_anchor))
        device = views[0][0].device
        return prompt_contrastive_loss(torch.cat(items), torch.cat(labels).to(device), torch.cat(anchors).to(device),
                                       self.config.cl_temperature)

    # ------------------------------------------------------------------------ checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"rows": self.embedding.rows.data, "rng": self.generator.get_state(),
                   "running_count": self.running_count}
        if self.running_maps is not None:
            tensors["running_maps"] = self.running_maps
        state = self.optimizer.state.get(self.embedding.rows, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                tensors[f"adam.{key}"] = torch.as_tensor(state[key])
        return tensors

    def save_checkpoint(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        meta = {"job_hash": self.config.job_hash(), "tokens": self.plan.all_token_strings(),
                "history": self.history, "train_seconds": self.train_seconds}
        path = save_checkpoint(self.checkpoint_dir, self.step, self.state_tensors(), meta,
                               keep=self.config.keep_checkpoints)
        for cb in self.callbacks:
            cb.on_checkpoint(self.step, path)
        return path

    def try_resume(self) -> bool:
        """Continue from the newest checkpoint of the same job, if there is one."""
        if self.checkpoint_dir is None:
            return False
        found = load_latest(self.checkpoint_dir)
        if found is None:
            return False
        tensors, meta = found
        if meta.get("job_hash") != self.config.job_hash() or meta.get("tokens") != self.plan.all_token_strings():
            raise RuntimeError(f"checkpoints in {self.checkpoint_dir} belong to a different job/config; "
                               "use another output folder or delete them")
        with torch.no_grad():
            self.embedding.rows.copy_(tensors["rows"])
        self.generator.set_state(tensors["rng"])
        self.running_count = tensors["running_count"].clone()
        self.running_maps = tensors["running_maps"].clone() if "running_maps" in tensors else None
        if "adam.exp_avg" in tensors:
            self.optimizer.state[self.embedding.rows] = {
                "step": tensors["adam.step"].clone(),
                "exp_avg": tensors["adam.exp_avg"].to(self.c.device).clone(),
                "exp_avg_sq": tensors["adam.exp_avg_sq"].to(self.c.device).clone()}
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))
        self.train_seconds = float(meta.get("train_seconds", 0.0))
        return True

    # ------------------------------------------------------------------------------ loop
    def train(self, max_steps: int | None = None) -> dict[str, torch.Tensor]:
        """Run to `config.steps` (or stop early after `max_steps` more steps, for tests/kills)."""
        self.try_resume()
        end = self.config.steps if max_steps is None else min(self.config.steps, self.step + max_steps)
        bar = tqdm(total=self.config.steps, initial=self.step, desc="mcpl", disable=not self.progress,
                   dynamic_ncols=True)
        while self.step < end:
            started = time.perf_counter()
            logs = self.train_step()
            self.train_seconds += time.perf_counter() - started
            self.history.append({"step": self.step, **logs})
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            for cb in self.callbacks:
                cb.on_step(self.step, logs)
            if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                self.save_checkpoint()
        bar.close()
        return self.learned_vectors()

    def close(self) -> None:
        """Give the frozen modules back untouched (original embedding table and processors)."""
        self.c.text_encoder.set_input_embeddings(self.embedding.base)
        restore_processors(self.c.unet, self._previous_processors)

    def learned_vectors(self) -> dict[str, torch.Tensor]:
        return token_vectors(self.plan, self.embedding.rows)

    def image_ids(self) -> list[str]:
        return [image_hash(i.image) for i in self.inputs]
