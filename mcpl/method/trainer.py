"""One MCPL job: learn new token embeddings from one image (or a diverse group).

Frozen: tokenizers, text encoders, UNet, VAE. Trained: the learned rows of each text stack
only. Each step: sample cached latents, noise them, predict with the UNet while recording
the learned words' cross-attention per sample, optionally mask the loss by those maps
(AttnMask) and add InfoNCE between the learned words' conditioning features (PromptCL,
Bind adj). A step is `prepare_step` (every random draw and the text encoding) ->
one UNet call -> `finish_step` (losses), so a pack of jobs can share one UNet call
(mcpl.method.packing) while each keeps its own rows, optimiser, RNG and masks.

Host synchronisation: nothing in a step reads a device value back; losses are kept as
device tensors and turned into numbers every `log_every` steps (every step on CPU, where
that costs nothing), at checkpoints and at the end.
"""

from __future__ import annotations

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
from mcpl.method.families.base import Components, Conditioning
from mcpl.method.images import LatentCache, encode_images
from mcpl.method.inputs import JobInput, image_hash
from mcpl.method.learned import LearnedTokenEmbedding, frozen_table, token_vectors
from mcpl.method.losses import masked_noise_loss, prompt_contrastive_loss
from mcpl.method.prompt_encoder import PromptEncoder, TextBatch
from mcpl.method.prompts import TEMPLATES, PromptPlan, plan_prompts


class TrainCallback(Protocol):
    """Observe training without the engine knowing who listens (progress, MLflow, Prefect)."""

    def on_step(self, step: int, logs: dict[str, float]) -> None: ...

    def on_checkpoint(self, step: int, path: Path) -> None: ...


def default_learning_rates(components: Components, batch_size: int) -> list[float]:
    """One lr per text stack, scaled with that table's token-embedding norm (tiny models need larger
    steps per unit of norm; SDXL's two tables differ); a model's hint wins."""
    if "learning_rate" in components.hints:
        return [float(components.hints["learning_rate"])] * len(components.stacks)
    return [1.3e-3 * batch_size * frozen_table(s.encoder).float().norm(dim=-1).mean().item()
            for s in components.stacks]


def default_learning_rate(components: Components, batch_size: int) -> float:
    """The primary stack's default lr (what job.json records as `learning_rate`)."""
    return default_learning_rates(components, batch_size)[0]


class CaptureUNet:
    """The UNet with capture processors on the chosen layers: prediction and per-sample maps in one call.

    One per UNet: a single job owns its own; a pack of jobs shares one (same layers).
    """

    def __init__(self, components: Components, layers: list[str]) -> None:
        self.c = components
        self.layers = layers
        self.store = AttentionStore()
        self._previous = install_capture(components.unet, self.store, layers)

    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                 concept_weights: torch.Tensor, record: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """UNet prediction and per-sample concept maps (B, C, h, w) from the same pass
        (None while recording is off: then the capture layers run the fused kernel)."""
        self.store.reset()
        self.store.enabled = record
        self.store.key_weights = concept_weights.to(self.c.device, non_blocking=True)
        self.store.rows = slice(None)
        self.store.latent_hw = tuple(noisy.shape[-2:])
        prediction = self.c.unet(noisy.to(self.c.dtype), timesteps.to(self.c.device),
                                 **cond.kwargs(self.c.dtype)).sample
        return prediction, self.store.aggregate() if record else None

    def close(self) -> None:
        restore_processors(self.c.unet, self._previous)


@dataclass
class StepInputs:
    """Everything one step of one job draws and encodes before the UNet call."""

    index: torch.Tensor  # (B,) training image of each sample (CPU)
    flip: torch.Tensor  # (B,) bool (CPU)
    picks: list[torch.Tensor]  # per sample: template indices of its views
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    text: TextBatch
    cond: Conditioning
    record: bool
    orders: list[torch.Tensor] | None = None  # per sample: phrase order of each extra PromptCL view


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without waiting for the device (pinned memory) when the device is a GPU."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class MCPLTrainer:
    """Holds one job's state; `train()` runs (or resumes) it to `config.steps`."""

    def __init__(self, components: Components, inputs: Sequence[JobInput], config: TrainConfig,
                 checkpoint_dir: str | Path | None = None, callbacks: Sequence[TrainCallback] = (),
                 progress: bool = True, *, unet: CaptureUNet | None = None, log_every: int | None = None,
                 gradient_checkpointing: bool = False) -> None:
        if not inputs:
            raise ValueError("a job needs at least one image")
        self.c = components
        self.inputs = list(inputs)
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.callbacks = list(callbacks)
        self.progress = progress
        self.plan: PromptPlan = plan_prompts([i.sentence for i in inputs], config.strategy,
                                             config.num_vectors, config.use_templates,
                                             components.hints.get("templates", TEMPLATES))
        self.resolution = config.resolution or components.default_resolution
        self.prompts = PromptEncoder(components, self.plan, inputs, config.bind_adj, self.resolution)
        self.labels = self.plan.labels
        self.latents: LatentCache = encode_images(components.vae, [i.image for i in inputs],
                                                  self.resolution, components.device)
        self.latent_hw = tuple(self.latents.mean.shape[-2:])
        self.layers = select_layers(components.unet, config.attention_layers,
                                    config.attention_downscale or components.hints.get("attention_downscale")
                                    or components.family.default_attention_downscale)
        self._own_unet = unet is None
        self.unet = unet or CaptureUNet(components, self.layers)
        if self.unet.layers != self.layers:
            raise ValueError("jobs packed on one UNet must record the same attention layers")
        if gradient_checkpointing:
            components.unet.enable_gradient_checkpointing()
        self.lrs = ([config.learning_rate] * len(components.stacks) if config.learning_rate
                    else default_learning_rates(components, config.batch_size))
        self.lr = self.lrs[0]
        self.optimizer = torch.optim.AdamW([{"params": [rows], "lr": lr} for rows, lr in
                                            zip(self.prompts.rows(), self.lrs, strict=True)], weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.running_maps: torch.Tensor | None = None  # (n_images, C, h, w), unflipped coords, on the device
        self.running_count = torch.zeros(len(inputs))
        self.history: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self.log_every = log_every or (1 if components.device.type == "cpu" else 10)
        self._pending: list[tuple[int, dict[str, torch.Tensor | float]]] = []

    # -------------------------------------------------------------------- compatibility
    @property
    def embedding(self) -> LearnedTokenEmbedding:
        """The primary text stack's learned rows."""
        return self.prompts.embeddings[0]

    @property
    def embeddings(self) -> list[LearnedTokenEmbedding]:
        return self.prompts.embeddings

    @property
    def store(self) -> AttentionStore:
        return self.unet.store

    def encode_prompts(self, image_index: Sequence[int], templates: Sequence[str],
                       full_length: bool = True, orders: Sequence[int] | None = None) -> TextBatch:
        return self.prompts.encode_prompts(image_index, templates, full_length, orders)

    def encode_text(self, text: TextBatch) -> Conditioning:
        return self.prompts.condition(text)

    def predict_with_maps(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                          concept_weights: torch.Tensor,
                          record: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.unet(noisy, timesteps, cond, concept_weights, record)

    # ---------------------------------------------------------------------------- model
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
        """Running mean of each image's maps over training steps (paper text: mean over t), on the device."""
        maps = maps.detach().float()
        flips = _to_device(flip, maps.device)[:, None, None, None]
        unflipped = torch.where(flips, maps.flip(-1), maps)
        if self.running_maps is None:
            self.running_maps = torch.zeros(len(self.inputs), *maps.shape[1:], device=maps.device)
        for b, i in enumerate(index.tolist()):  # index lives on the CPU: no device read
            self.running_count[i] += 1
            self.running_maps[i] += (unflipped[b] - self.running_maps[i]) / float(self.running_count[i])
        current = self.running_maps[_to_device(index, maps.device)]
        return torch.where(flips, current.flip(-1), current)

    # ----------------------------------------------------------------------------- step
    def prepare_step(self) -> StepInputs:
        """Every random draw of the step (CPU generator: the same on every device) and the text encoding."""
        cfg, g, device = self.config, self.generator, self.c.device
        batch = cfg.batch_size
        views = cfg.cl_views if cfg.prompt_cl else 1
        index = torch.randint(len(self.inputs), (batch,), generator=g)
        flip = torch.rand(batch, generator=g) < cfg.flip_p
        n_templates = len(self.plan.templates)
        picks = [torch.randperm(n_templates, generator=g)[:views] if n_templates >= views
                 else torch.randint(n_templates, (views,), generator=g) for _ in range(batch)]
        # With cl_reorder, extra PromptCL views list the sentence's phrases in another order where it has
        # several ("a blue <b> and a red <a>"): they differ from the UNet's prompt even with one template.
        # Drawn only then, so the default's random stream is the one it always was.
        orders = None
        if cfg.cl_reorder and views > 1 and self.plan.reorderable:
            orders = [torch.randint(1, self.plan.n_orders(int(i)), (views - 1,), generator=g)
                      if self.plan.n_orders(int(i)) > 1 else torch.zeros(views - 1, dtype=torch.long) for i in index]
        written = self._phrase_orders(index) if cfg.phrase_shuffle > 0 and self.plan.reorderable else None
        eps = torch.randn(batch, *self.latents.mean.shape[2:], generator=g)
        noise = torch.randn(batch, *self.latents.mean.shape[2:], generator=g)
        timesteps = torch.randint(0, self.c.scheduler.config.num_train_timesteps, (batch,), generator=g)

        latents = self.latents.sample(_to_device(index, device), _to_device(flip, device), _to_device(eps, device))
        noise, timesteps = _to_device(noise, device), _to_device(timesteps, device)
        noisy = self.c.scheduler.add_noise(latents, noise, timesteps)
        text = self.encode_prompts(index.tolist(), [self.plan.templates[int(p[0])] for p in picks], orders=written)
        return StepInputs(index, flip, picks, latents, noise, timesteps, noisy, text, self.encode_text(text),
                          record=cfg.attn_mask, orders=orders)

    def _phrase_orders(self, index: torch.Tensor) -> list[int]:
        """Per sample, the phrase order of the UNet's prompt (0: as written), drawn only when
        phrase_shuffle is set and a sentence can be reordered, so otherwise the random stream (and
        the result) is the one without it."""
        g, p = self.generator, self.config.phrase_shuffle
        shuffle = torch.rand(len(index), generator=g) < p
        other = [int(torch.randint(1, max(2, self.plan.n_orders(int(i))), (1,), generator=g)) for i in index]
        return [o if flip and self.plan.n_orders(int(i)) > 1 else 0
                for o, flip, i in zip(other, shuffle.tolist(), index.tolist(), strict=True)]

    def finish_step(self, s: StepInputs, prediction: torch.Tensor,
                    maps: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The job's loss from its slice of the UNet call: masked noise loss (+ lambda PromptCL)."""
        cfg = self.config
        mask = self._mask(maps, s.index, s.flip) if maps is not None else None
        noise_loss = masked_noise_loss(prediction, self._target(s.latents, s.noise, s.timesteps), mask)
        loss = noise_loss
        logs: dict[str, torch.Tensor] = {"noise_loss": noise_loss.detach()}
        if cfg.prompt_cl:
            views = cfg.cl_views
            images = s.index.tolist()
            extra = self.encode_prompts(images * (views - 1), [self.plan.templates[int(p[v])]
                                                               for v in range(1, views) for p in s.picks],
                                        full_length=False,
                                        orders=None if s.orders is None else
                                        [int(o[v - 1]) for v in range(1, views) for o in s.orders])
            cl = self.contrastive_loss([(s.cond.hidden, s.text), (self.encode_text(extra).hidden, extra)])
            loss = loss + cfg.cl_weight * cl
            logs["cl_loss"] = cl.detach()
        logs["loss"] = loss.detach()
        logs["mask_fraction"] = mask.mean().detach() if mask is not None else torch.ones(())
        return loss, logs

    def set_lr(self) -> float:
        warm = min(1.0, (self.step + 1) / max(1, self.config.lr_warmup_steps))
        for group, lr in zip(self.optimizer.param_groups, self.lrs, strict=True):
            group["lr"] = lr * warm
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self) -> dict[str, float]:
        """One step of this job alone; returns its logs as numbers (reads the device back)."""
        logs = self._step()
        return {k: float(v) for k, v in logs.items()}

    def _step(self) -> dict[str, torch.Tensor | float]:
        s = self.prepare_step()
        prediction, maps = self.predict_with_maps(s.noisy, s.timesteps, s.cond, s.text.concept_weights, s.record)
        loss, logs = self.finish_step(s, prediction, maps)
        lr = self.set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return {**logs, "lr": lr}

    def contrastive_loss(self, views: Sequence[tuple[torch.Tensor, TextBatch]]) -> torch.Tensor:
        """PromptCL over all prompt views; Bind adj adds each concept's adjective as a positive.

        `views` pairs conditioning features (N, L, D) with their TextBatch; items are pooled over
        all. Which items exist is known on the CPU (the prompt weights), so picking them is an
        index, not a boolean mask that would make the device report back.
        """
        items, labels, anchors = [], [], []
        kinds = [("concept", True)] + ([("adjective", False)] if self.config.bind_adj else [])
        for hidden, text in views:
            for kind, is_anchor in kinds:
                weights = text.concept_weights if kind == "concept" else text.adjective_weights
                present = weights.sum(-1) > 0  # (N, C), CPU
                where = present.nonzero()  # (K, 2), CPU
                if where.numel() == 0:
                    continue
                features = torch.einsum("ncl,nld->ncd", weights.to(hidden.device, hidden.dtype), hidden)
                flat = where[:, 0] * present.shape[1] + where[:, 1]
                items.append(features.reshape(-1, features.shape[-1])[_to_device(flat, hidden.device)])
                labels.append(where[:, 1])
                anchors.append(torch.full((where.shape[0],), is_anchor))
        device = views[0][0].device
        return prompt_contrastive_loss(torch.cat(items), _to_device(torch.cat(labels), device),
                                       _to_device(torch.cat(anchors), device), self.config.cl_temperature)

    # ------------------------------------------------------------------------ checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"rng": self.generator.get_state(), "running_count": self.running_count}
        if self.running_maps is not None:
            tensors["running_maps"] = self.running_maps
        for s, rows in enumerate(self.prompts.rows()):
            suffix = "" if s == 0 else f".{s}"
            tensors[f"rows{suffix}"] = rows.data
            state = self.optimizer.state.get(rows, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in state:
                    tensors[f"adam{suffix}.{key}"] = torch.as_tensor(state[key])
        return tensors

    def save_checkpoint(self) -> Path | None:
        self.flush_logs()
        if self.checkpoint_dir is None:
            return None
        from mcpl.provenance import git_revision

        meta = {"job_hash": self.config.job_hash(), "tokens": self.plan.all_token_strings(),
                "history": self.history, "train_seconds": self.train_seconds, "git_rev": git_revision()}
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
        device = self.c.device
        for s, rows in enumerate(self.prompts.rows()):
            suffix = "" if s == 0 else f".{s}"
            with torch.no_grad():
                rows.copy_(tensors[f"rows{suffix}"])
            if f"adam{suffix}.exp_avg" in tensors:
                self.optimizer.state[rows] = {
                    "step": tensors[f"adam{suffix}.step"].clone(),
                    "exp_avg": tensors[f"adam{suffix}.exp_avg"].to(device).clone(),
                    "exp_avg_sq": tensors[f"adam{suffix}.exp_avg_sq"].to(device).clone()}
        self.generator.set_state(tensors["rng"])
        self.running_count = tensors["running_count"].clone()
        self.running_maps = tensors["running_maps"].to(device).clone() if "running_maps" in tensors else None
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))
        self.train_seconds = float(meta.get("train_seconds", 0.0))
        return True

    # ------------------------------------------------------------------------------ loop
    def record(self, logs: dict[str, torch.Tensor | float], seconds: float) -> None:
        """Keep a finished step's logs; numbers are read back every `log_every` steps and at checkpoints."""
        self.train_seconds += seconds
        self._pending.append((self.step, logs))
        if len(self._pending) >= self.log_every:
            self.flush_logs()
        if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
            self.save_checkpoint()

    def flush_logs(self) -> None:
        """Turn pending device values into numbers (one read-back for many steps) and tell the callbacks."""
        pending, self._pending = self._pending, []
        for step, logs in pending:
            numbers = {k: float(v) for k, v in logs.items()}
            self.history.append({"step": step, **numbers})
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{numbers['loss']:.4f}", refresh=False)
            for cb in self.callbacks:
                cb.on_step(step, numbers)

    bar = None

    def begin(self, max_steps: int | None = None) -> int:
        """Resume if possible; the step this run will stop at."""
        self.try_resume()
        self.bar = tqdm(total=self.config.steps, initial=self.step, desc="mcpl", disable=not self.progress,
                        dynamic_ncols=True)
        return self.config.steps if max_steps is None else min(self.config.steps, self.step + max_steps)

    def end(self) -> dict[str, torch.Tensor]:
        self.flush_logs()
        if self.bar is not None:
            self.bar.close()
        return self.learned_vectors()

    def train(self, max_steps: int | None = None) -> dict[str, torch.Tensor]:
        """Run to `config.steps` (or stop early after `max_steps` more steps, for tests/kills)."""
        end = self.begin(max_steps)
        while self.step < end:
            started = time.perf_counter()
            logs = self._step()
            self.bar.update(1)
            self.record(logs, time.perf_counter() - started)
        return self.end()

    def close(self) -> None:
        """Give the frozen modules back untouched (processors; rows are attached only while encoding)."""
        if self._own_unet:
            self.unet.close()

    def learned_vectors(self) -> dict[str, torch.Tensor]:
        """token -> rows of the primary stack (diffusers' single-encoder layout)."""
        return token_vectors(self.plan, self.embedding.rows)

    def stack_vectors(self) -> list[dict[str, torch.Tensor]]:
        """Per text stack: token -> rows (SDXL: text_encoder, then text_encoder_2)."""
        return [token_vectors(self.plan, e.rows) for e in self.embeddings]

    def image_ids(self) -> list[str]:
        return [image_hash(i.image) for i in self.inputs]
