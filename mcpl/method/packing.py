"""Packed jobs: K jobs on one model, one UNet call per step, each job still its own.

Every job keeps its learned rows, optimiser state, RNG stream, AttnMask, PromptCL,
checkpoints and callbacks; only the UNet call is shared: the jobs' noisy latents and
conditioning are stacked into one batch and the prediction (and the attention maps) are
split back. The jobs' losses are summed before one backward pass; since a job's rows only
reach its own samples, each job gets exactly the gradient it would get alone (equal to
float tolerance: a larger batch changes the order of some sums). A job whose step or
callback raises leaves the pack with its error; the others go on. Packed jobs must use the
same model, latent size and attention layers (`pack_key`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mcpl.config import TrainConfig
from mcpl.method.families.base import Components, Conditioning
from mcpl.method.inputs import JobInput
from mcpl.method.trainer import CaptureUNet, MCPLTrainer, TrainCallback


@dataclass
class PackedJob:
    """One job of a pack: what it trains on, how, where it checkpoints, who listens."""

    inputs: Sequence[JobInput]
    config: TrainConfig
    checkpoint_dir: str | Path | None = None
    callbacks: Sequence[TrainCallback] = field(default_factory=list)


def pack_key(config: TrainConfig, components: Components) -> tuple:
    """Jobs with equal keys can share a UNet call: same latent side and attention layers."""
    return (config.resolution or components.default_resolution, tuple(config.attention_layers or ()),
            config.attention_downscale)


class PackedTrainer:
    """Trains several jobs together; `train()` returns each job's learned vectors or its exception."""

    def __init__(self, components: Components, jobs: Sequence[PackedJob], log_every: int | None = None,
                 gradient_checkpointing: bool = False) -> None:
        if not jobs:
            raise ValueError("a pack needs at least one job")
        self.c = components
        first = MCPLTrainer(components, jobs[0].inputs, jobs[0].config, jobs[0].checkpoint_dir, jobs[0].callbacks,
                            progress=False, log_every=log_every, gradient_checkpointing=gradient_checkpointing)
        self.unet: CaptureUNet = first.unet
        self.trainers = [first] + [MCPLTrainer(components, j.inputs, j.config, j.checkpoint_dir, j.callbacks,
                                               progress=False, unet=self.unet, log_every=log_every)
                                   for j in jobs[1:]]
        self.errors: dict[int, BaseException] = {}
        self.train_seconds = 0.0

    def train(self) -> list[dict[str, torch.Tensor] | BaseException]:
        ends = []
        for k, trainer in enumerate(self.trainers):
            try:
                ends.append(trainer.begin())
            except Exception as err:  # a job that cannot resume leaves the pack, the others train
                self.errors[k] = err
                ends.append(trainer.step)
        while True:
            active = [k for k, t in enumerate(self.trainers) if k not in self.errors and t.step < ends[k]]
            if not active:
                break
            started = time.perf_counter()
            logs = self._step(active)
            seconds = (time.perf_counter() - started) / len(logs)
            for k, job_logs in logs.items():
                try:
                    self.trainers[k].record(job_logs, seconds)
                except Exception as err:  # a callback (or a checkpoint write) failed this job only
                    self.errors[k] = err
            self.train_seconds += seconds * len(logs)
        out: list[dict[str, torch.Tensor] | BaseException] = []
        for k, trainer in enumerate(self.trainers):
            if k in self.errors:
                out.append(self.errors[k])
                continue
            try:
                out.append(trainer.end())
            except Exception as err:  # noqa: BLE001 - this job's last flush failed; it alone fails
                out.append(err)
        return out

    def _step(self, active: list[int]) -> dict[int, dict]:
        """One step of every active job with a single UNet call."""
        prepared = {}
        for k in active:
            try:
                prepared[k] = self.trainers[k].prepare_step()
            except Exception as err:  # noqa: BLE001 - this job leaves the pack
                self.errors[k] = err
        if not prepared:
            return {}
        jobs = list(prepared)
        steps = [prepared[k] for k in jobs]
        widest = max(s.text.concept_weights.shape[1] for s in steps)
        weights = torch.cat([torch.nn.functional.pad(s.text.concept_weights,
                                                     (0, 0, 0, widest - s.text.concept_weights.shape[1]))
                             for s in steps])
        record = any(s.record for s in steps)
        prediction, maps = self.unet(torch.cat([s.noisy for s in steps]), torch.cat([s.timesteps for s in steps]),
                                     Conditioning.cat([s.cond for s in steps]), weights, record)
        losses, logs, start = [], {}, 0
        for k, s in zip(jobs, steps, strict=True):
            rows = slice(start, start + s.noisy.shape[0])
            start = rows.stop
            concepts = s.text.concept_weights.shape[1]
            own_maps = maps[rows, :concepts] if (maps is not None and s.record) else None
            try:
                loss, job_logs = self.trainers[k].finish_step(s, prediction[rows], own_maps)
            except Exception as err:  # noqa: BLE001 - this job leaves the pack
                self.errors[k] = err
                continue
            losses.append(loss)
            logs[k] = job_logs
        lrs = {k: self.trainers[k].set_lr() for k in logs}
        for k in logs:
            self.trainers[k].optimizer.zero_grad(set_to_none=True)
        if losses:
            torch.stack(losses).sum().backward()
        for k in logs:
            trainer = self.trainers[k]
            trainer.optimizer.step()
            trainer.step += 1
            logs[k]["lr"] = lrs[k]
        return logs

    def close(self) -> None:
        self.unet.close()
