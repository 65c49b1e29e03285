"""Run one job end to end and write its bundle: concepts, maps, overlays, samples, metrics.

Bundle layout (`out_dir`):
    job.json                          what was learned, from what, with which settings, metrics
    concepts/<name>/learned_embeds.safetensors   one per concept, diffusers' format + metadata
    embeddings.safetensors            every learned token of the job (MCPL-all words included)
    attention/image_<i>.safetensors   per-concept maps on the training image (timestep mean)
    attention/image_<i>.png           the same as overlays
    samples/<name>.png, samples/composed.png   generations with the learned words
    checkpoints/                      resumable state (safe to delete once done)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from mcpl.concepts.embeddings import EMBEDS_FILE, save_concept
from mcpl.concepts.metrics import concept_metrics
from mcpl.concepts.overlay import attention_figure, grid
from mcpl.config import TrainConfig
from mcpl.method.images import square_resize
from mcpl.method.models import Components, load_components, model_hash
from mcpl.method.prompts import parse_sentence
from mcpl.method.trainer import JobInput, MCPLTrainer, TrainCallback

JOB_FILE = "job.json"


@dataclass
class JobResult:
    out_dir: Path
    record: dict

    @property
    def concept_files(self) -> dict[str, Path]:
        return {c["token"]: self.out_dir / c["file"] for c in self.record["concepts"]}


@torch.no_grad()
def image_attention_maps(trainer: MCPLTrainer, image_index: int, n_timesteps: int,
                         seed: int = 1234) -> dict[str, torch.Tensor]:
    """Each concept's map on a training image, averaged over noise levels (fixed seed)."""
    c = trainer.c
    total = c.scheduler.config.num_train_timesteps
    steps = torch.linspace(0.1 * total, 0.9 * total, n_timesteps).long()
    g = torch.Generator().manual_seed(seed)
    index = torch.full((n_timesteps,), image_index)
    flip = torch.zeros(n_timesteps, dtype=torch.bool)
    eps = torch.randn(n_timesteps, *trainer.latents.mean.shape[2:], generator=g)
    noise = torch.randn(n_timesteps, *trainer.latents.mean.shape[2:], generator=g).to(c.device)
    latents = trainer.latents.sample(index.to(c.device), flip.to(c.device), eps)
    noisy = c.scheduler.add_noise(latents, noise, steps.to(c.device))
    text = trainer.encode_prompts([image_index] * n_timesteps, ["{}"] * n_timesteps)
    hidden = trainer.encode_text(text.ids)
    _, maps = trainer.predict_with_maps(noisy, steps, hidden, text.concept_weights)
    mean = maps.mean(0).cpu()
    return {tok.token: mean[i] for i, tok in enumerate(trainer.plan.tokens)}


def run_job(model: str | Components, inputs: Sequence[JobInput], config: TrainConfig, out_dir: str | Path,
            callbacks: Sequence[TrainCallback] = (), device: str | None = None, samples: int = 2,
            sample_steps: int = 25, progress: bool = True) -> JobResult:
    """Train (resuming if checkpoints exist) and write the job's bundle.

    `model` is a model id/folder, or already loaded Components to share across jobs of one
    process (the trainer hands them back unchanged).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    components = model if isinstance(model, Components) else load_components(model, device)
    started = time.time()
    trainer = MCPLTrainer(components, inputs, config, out, callbacks=callbacks, progress=progress)
    try:
        vectors = trainer.train()
        record = write_bundle(trainer, vectors, out)
    finally:
        trainer.close()
    record["wall_seconds"] = round(time.time() - started, 2)
    if samples:
        template = components.hints.get("templates", ["a photo of {}"])[0]
        record["samples"] = write_samples(components.name, out, record, samples, sample_steps, config.seed,
                                          str(components.device), template)
    (out / JOB_FILE).write_text(json.dumps(record, indent=1))
    return JobResult(out, record)


def write_bundle(trainer: MCPLTrainer, vectors: dict[str, torch.Tensor], out: Path) -> dict:
    config, plan, c = trainer.config, trainer.plan, trainer.c
    image_ids = trainer.image_ids()
    base = {"base_model": c.name, "base_model_hash": model_hash(c.name), "strategy": config.strategy,
            "seed": config.seed, "steps": trainer.step, "config_hash": config.job_hash()}
    concepts = []
    for tok in plan.tokens:
        if plan_is_word(tok.label, config.strategy):
            continue
        sentences = [i.sentence.source for i in trainer.inputs if tok.token in {x.token for x in i.sentence.concepts}]
        meta = {**base, "token": tok.token, "initializer": tok.initializer, "adjective": tok.adjective or "",
                "sentences": sentences, "image_hashes": image_ids, "num_vectors": config.num_vectors}
        rel = Path("concepts") / tok.label / EMBEDS_FILE
        save_concept(out / rel, tok.token, vectors[tok.token], meta)
        concepts.append({"token": tok.token, "name": tok.label, "initializer": tok.initializer,
                         "adjective": tok.adjective, "file": str(rel)})
    save_file({k: v for k, v in vectors.items()}, str(out / "embeddings.safetensors"),
              metadata={k: str(v) for k, v in base.items()})
    metrics: dict[str, dict] = {}
    images = []
    for i, item in enumerate(trainer.inputs):
        maps = image_attention_maps(trainer, i, config.map_timesteps)
        in_sentence = {x.token for x in item.sentence.concepts}
        concept_maps = {t: m for t, m in maps.items() if t in in_sentence}
        (out / "attention").mkdir(exist_ok=True)
        save_file({t: m.contiguous() for t, m in maps.items()}, str(out / "attention" / f"image_{i}.safetensors"))
        shown = square_resize(item.image, trainer.resolution)
        attention_figure(shown, concept_maps, out / "attention" / f"image_{i}.png")
        if item.masks:
            masks = {t: square_resize(m, trainer.resolution) for t, m in item.masks.items()}
            metrics[f"image_{i}"] = concept_metrics(concept_maps, masks, config.mask_threshold)
        images.append({"source": item.source, "sentence": item.sentence.source, "hash": image_ids[i],
                       "overlay": f"attention/image_{i}.png"})
    losses = [h["loss"] for h in trainer.history]
    return {**base, "job_id": job_id(image_ids, [i.sentence.source for i in trainer.inputs], config, c.name),
            "config": config.model_dump(), "learning_rate": trainer.lr, "attention_layers": trainer.layers,
            "concepts": concepts, "images": images, "metrics": metrics,
            "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])), "train_seconds": trainer.train_seconds,
            "history": trainer.history}


def plan_is_word(label: str, strategy: str) -> bool:
    """MCPL-all's per-word tokens are learnable but are not concepts of their own."""
    return strategy == "all" and label.startswith("w") and "." in label


def job_id(image_hashes: Sequence[str], sentences: Sequence[str], config: TrainConfig, model: str) -> str:
    """Stable id from content + config + model: the same work always gets the same id."""
    key = json.dumps([list(image_hashes), list(sentences), config.job_hash(), model_hash(model)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def write_samples(model: str, out: Path, record: dict, n: int, steps: int, seed: int, device: str,
                  template: str = "a photo of {}") -> dict:
    """Generate each concept alone (`template` around "a <token>", in the phrasing the model
    knows) and all together, with the files diffusers would load."""
    from mcpl.concepts.generate import generate, load_concepts, load_pipeline

    pipe = load_pipeline(model, device)
    files = [out / c["file"] for c in record["concepts"]]
    tokens = load_concepts(pipe, files)
    written, rows, labels = {}, [], []
    prompts = {c["name"]: template.format(f"a {c['token']}") for c in record["concepts"]}
    prompts["composed"] = parse_sentence(record["images"][0]["sentence"]).as_prompt()
    for name, prompt in prompts.items():
        result = generate(pipe, prompt, tokens, num_images=n, steps=steps, seed=seed)
        rows.append(result.images)
        labels.append(prompt)
        path = out / "samples" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        grid([result.images], [prompt]).save(path)
        written[name] = {"prompt": prompt, "file": str(path.relative_to(out))}
    grid(rows, labels).save(out / "samples" / "all.png")
    return written
