"""Run one job end to end and write its bundle: concepts, maps, overlays, samples, metrics.

The layout of what is written is mcpl.job.bundle's; this module only fills it. A job
resumes from its bundle's checkpoints, so running the same job again continues it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mcpl.concepts.embeddings import save_concept_stacks, save_file
from mcpl.concepts.metrics import concept_metrics
from mcpl.concepts.overlay import attention_figure, grid
from mcpl.config import RunOptions, TrainConfig
from mcpl.job.bundle import OVERLAY_FILE, Bundle, ConceptEntry, ImageEntry, JobRecord, job_id
from mcpl.method.images import square_resize
from mcpl.method.inputs import JobInput
from mcpl.method.model_files import model_hash
from mcpl.method.models import Components, load_components
from mcpl.method.prompts import parse_sentence
from mcpl.method.trainer import MCPLTrainer, TrainCallback
from mcpl.provenance import git_revision


@dataclass
class JobResult:
    bundle: Bundle
    record: JobRecord

    @property
    def out_dir(self) -> Path:
        return self.bundle.path

    @property
    def concept_files(self) -> dict[str, Path]:
        return self.bundle.concept_files(self.record)


def inputs_job_id(inputs: Sequence[JobInput], config: TrainConfig, model: str) -> str:
    """The id of the job these inputs make under this config and model (the pipeline's id too)."""
    from mcpl.method.inputs import image_hash

    return job_id([image_hash(i.image) for i in inputs], [i.sentence.source for i in inputs], config.job_hash(),
                  model_hash(model))


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
    _, maps = trainer.predict_with_maps(noisy, steps, trainer.encode_text(text), text.concept_weights)
    mean = maps.mean(0).cpu()
    return {tok.token: mean[i] for i, tok in enumerate(trainer.plan.tokens)}


@dataclass
class JobWork:
    """One job for `run_jobs`: its inputs, config, bundle folder and the engine callbacks it gets."""

    inputs: Sequence[JobInput]
    config: TrainConfig
    out_dir: str | Path
    callbacks: Sequence[TrainCallback] = ()


def run_job(model: str | Components, inputs: Sequence[JobInput], config: TrainConfig, out_dir: str | Path,
            callbacks: Sequence[TrainCallback] = (), options: RunOptions | None = None) -> JobResult:
    """Train (resuming if checkpoints exist) and write the job's bundle; raise if it fails."""
    result = run_jobs(model, [JobWork(inputs, config, out_dir, callbacks)], options)[0]
    if isinstance(result, BaseException):
        raise result
    return result


def run_jobs(model: str | Components, works: Sequence[JobWork],
             options: RunOptions | None = None) -> list[JobResult | BaseException]:
    """Train several jobs on one model, packed into one UNet call per step when there are several
    (mcpl.method.packing), and write each bundle. A job's failure is its entry in the result;
    a single job's failure is raised (nothing else to protect).

    `model` is a model id/folder, or already loaded Components to share across jobs of one
    process (the trainers hand them back unchanged).
    """
    options = options or RunOptions()
    feature_models = fidelity_models(options)  # before training: a bad folder fails now, not after it
    components = model if isinstance(model, Components) else load_components(model, options.device)
    bundles = [Bundle(w.out_dir) for w in works]
    for bundle in bundles:
        bundle.path.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if len(works) == 1:
        work = works[0]
        trainer = MCPLTrainer(components, work.inputs, work.config, bundles[0].checkpoints, callbacks=work.callbacks,
                              progress=options.progress, gradient_checkpointing=options.gradient_checkpointing)
        trainers, closer = [trainer], trainer
        try:
            learned: list = [trainer.train()]
        except BaseException:
            trainer.close()
            raise
    else:
        from mcpl.method.packing import PackedJob, PackedTrainer

        pack = PackedTrainer(components, [PackedJob(w.inputs, w.config, b.checkpoints, w.callbacks)
                                          for w, b in zip(works, bundles, strict=True)],
                             gradient_checkpointing=options.gradient_checkpointing)
        trainers, closer = pack.trainers, pack
        learned = pack.train()
    results: list[JobResult | BaseException] = []
    try:
        for trainer, vectors, bundle in zip(trainers, learned, bundles, strict=True):
            if isinstance(vectors, BaseException):
                results.append(vectors)
                continue
            try:
                record = write_bundle(trainer, vectors, bundle)
            except Exception as err:  # noqa: BLE001 - one job's bundle failed; the pack's others are fine
                if len(works) == 1:
                    raise
                results.append(err)
                continue
            results.append(JobResult(bundle, record))
    finally:
        closer.close()
    template = components.hints.get("templates", ["a photo of {}"])[0]
    for result, work in zip(results, works, strict=True):
        if isinstance(result, BaseException):
            continue
        result.record.wall_seconds = round(time.time() - started, 2)
        if options.samples:
            result.record.samples = write_samples(components, result.bundle, result.record, options,
                                                  work.config.seed, template)
            if feature_models:
                merge_metrics(result.record.metrics,
                              bundle_fidelity(result.bundle, result.record, work.inputs, feature_models))
        result.bundle.write_record(result.record)
    return results


def plan_is_word(label: str, strategy: str) -> bool:
    """MCPL-all's per-word tokens are learnable but are not concepts of their own."""
    return strategy == "all" and label.startswith("w") and "." in label


def write_bundle(trainer: MCPLTrainer, vectors: dict[str, torch.Tensor], bundle: Bundle) -> JobRecord:
    """Concept files, the job's embeddings, maps and overlays (+ metrics where masks exist)."""
    config, plan, c = trainer.config, trainer.plan, trainer.c
    image_ids = trainer.image_ids()
    base = {"base_model": c.name, "base_model_hash": model_hash(c.name), "strategy": config.strategy,
            "seed": config.seed, "steps": trainer.step, "config_hash": config.job_hash()}
    stacks = trainer.prompts.stacks
    per_stack = trainer.stack_vectors()
    concepts = []
    for tok in plan.tokens:
        if plan_is_word(tok.label, config.strategy):
            continue
        sentences = [i.sentence.source for i in trainer.inputs if tok.token in {x.token for x in i.sentence.concepts}]
        meta = {**base, "token": tok.token, "initializer": tok.initializer, "adjective": tok.adjective or "",
                "sentences": sentences, "image_hashes": image_ids, "num_vectors": config.num_vectors,
                "family": c.family.name}
        rel = Bundle.concept_rel(tok.label)
        save_concept_stacks(bundle.file(rel), tok.token, [v[tok.token] for v in per_stack],
                            [s.file_suffix for s in stacks], [s.export_key for s in stacks], meta)
        concepts.append(ConceptEntry(tok.token, tok.label, tok.initializer, tok.adjective, rel))
    everything = dict(vectors)
    for stack, stack_vectors in zip(stacks[1:], per_stack[1:], strict=True):  # SDXL's text_encoder_2 rows
        everything.update({f"{stack.key}/{t}": v for t, v in stack_vectors.items()})
    save_file(everything, str(bundle.embeddings_file),
              metadata={k: str(v) for k, v in {**base, "family": c.family.name}.items()})
    metrics: dict[str, dict] = {}
    images = []
    overlaid: set[str] = set()
    bundle.attention_dir.mkdir(exist_ok=True)
    for i, item in enumerate(trainer.inputs):
        maps = image_attention_maps(trainer, i, config.map_timesteps)
        in_sentence = {x.token for x in item.sentence.concepts}
        concept_maps = {t: m for t, m in maps.items() if t in in_sentence}
        save_file({t: m.contiguous() for t, m in maps.items()}, str(bundle.attention_maps_file(i)))
        shown = square_resize(item.image, trainer.resolution)
        attention_figure(shown, concept_maps, bundle.file(Bundle.overlay_rel(i)))
        for entry in concepts:  # each concept's own overlay, on the first image that marks it
            own = bundle.concept_folder(entry.name) / OVERLAY_FILE
            if entry.token in concept_maps and entry.name not in overlaid:
                attention_figure(shown, {entry.token: concept_maps[entry.token]}, own)
                overlaid.add(entry.name)
        if item.masks:
            masks = {t: square_resize(m, trainer.resolution) for t, m in item.masks.items()}
            metrics[f"image_{i}"] = concept_metrics(concept_maps, masks, config.mask_threshold)
        images.append(ImageEntry(item.source, item.sentence.source, image_ids[i], Bundle.overlay_rel(i)))
    losses = [h["loss"] for h in trainer.history]
    return JobRecord(
        job_id=job_id(image_ids, [i.sentence.source for i in trainer.inputs], config.job_hash(), model_hash(c.name)),
        **base, config=config.model_dump(), learning_rate=trainer.lr, attention_layers=trainer.layers,
        family=c.family.name, widths=c.widths, learning_rates=trainer.lrs,
        concepts=concepts, images=images, metrics=metrics,
        final_loss=sum(losses[-20:]) / max(1, len(losses[-20:])), train_seconds=trainer.train_seconds,
        history=trainer.history, git_rev=git_revision())


def write_samples(components: Components, bundle: Bundle, record: JobRecord, options: RunOptions, seed: int,
                  template: str = "a photo of {}") -> dict:
    """Generate each concept alone (`template` around "a <token>", in the phrasing the model
    knows) and all together, with the files tools load, on the job's already loaded model."""
    from mcpl.concepts.generate import borrowed_pipeline, generate, load_concepts

    written, rows, labels = {}, [], []
    prompts = {c.name: template.format(f"a {c.token}") for c in record.concepts}
    prompts["composed"] = parse_sentence(record.images[0].sentence).as_prompt()
    bundle.samples_dir.mkdir(exist_ok=True)
    with borrowed_pipeline(components) as pipe:
        tokens = load_concepts(pipe, list(bundle.concept_files(record).values()))
        for name, prompt in prompts.items():
            result = generate(pipe, prompt, tokens, num_images=options.samples, steps=options.sample_steps,
                              seed=seed)
            rows.append(result.images)
            labels.append(prompt)
            rel = Bundle.sample_rel(name)
            grid([result.images], [prompt]).save(bundle.file(rel))
            written[name] = {"prompt": prompt, "file": rel}
            concept = next((c for c in record.concepts if c.name == name), None)
            if concept is not None:  # each generation and its attention, for the fidelity metric
                written[name].update(save_generations(bundle, name, concept.token, result))
    grid(rows, labels).save(bundle.file(Bundle.sample_rel("all")))
    return written


def save_generations(bundle: Bundle, name: str, token: str, generation) -> dict:
    """A concept's generations one file each, and its attention in them: {"images": [...], "maps": rel}."""
    images = [Bundle.sample_image_rel(name, k) for k in range(len(generation.images))]
    for image, rel in zip(generation.images, images, strict=True):
        path = bundle.file(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    maps = Bundle.sample_maps_rel(name)
    save_file({token: torch.stack([m[token].float() for m in generation.maps]).contiguous()}, str(bundle.file(maps)))
    return {"images": images, "maps": maps}


# ------------------------------------------------------------------------------- fidelity
def fidelity_models(options: RunOptions) -> list:
    """The feature models RunOptions names (loaded once per process), or [] when none is named."""
    from mcpl.concepts.fidelity import load_models
    from mcpl.errors import ConfigError

    paths = [options.fidelity_model, options.clip_model]
    if not any(paths):
        return []
    if not options.samples:
        raise ConfigError("the fidelity metric compares a concept's generations with its object: it needs "
                          "samples >= 1 (--samples N; the paper averages over 8 or more)")
    return load_models(paths, options.device)


def merge_metrics(metrics: dict, extra: dict) -> dict:
    """Add per-image, per-token values (image_<i> -> token -> {name: value}) to a record's metrics."""
    for image_key, per_token in extra.items():
        for token, values in per_token.items():
            metrics.setdefault(image_key, {}).setdefault(token, {}).update(values)
    return metrics


def bundle_fidelity(bundle: Bundle, record: JobRecord, inputs: Sequence[JobInput], models: Sequence) -> dict:
    """The fidelity metric (mcpl.concepts.fidelity) of every concept on every training image that marks it,
    from the bundle's own files (each generation and its maps, the maps on the training images) and the
    training images with their masks: image_<i> -> token -> {fidelity_<kind>, clip_t}. Raises BundleError
    when the bundle has no per-image samples."""
    from PIL import Image
    from safetensors.torch import load_file

    from mcpl.concepts import fidelity
    from mcpl.errors import BundleError

    if len(inputs) != len(record.images):
        raise BundleError(f"{bundle.path}: {len(inputs)} training image(s) given for a job of {len(record.images)}")
    threshold = float(record.config.get("mask_threshold", 0.5))
    generations: dict[str, tuple[list, list, str]] = {}
    for concept in record.concepts:
        sample = record.samples.get(concept.name) if isinstance(record.samples, dict) else None
        if not isinstance(sample, dict) or not sample.get("images") or not sample.get("maps"):
            raise BundleError(f"{bundle.path} has no per-image samples of {concept.token} (made with --samples 0 "
                              "or before the fidelity metric); run the job again with --samples N")
        images = [Image.open(bundle.file(rel)).convert("RGB") for rel in sample["images"]]
        stack = load_file(str(bundle.file(sample["maps"]))).get(concept.token)
        maps = list(stack) if stack is not None and len(stack) == len(images) else [None] * len(images)
        text = fidelity.concept_words(sample.get("prompt", "a photo of a {}"), concept.token, concept.initializer,
                                      concept.adjective)
        generations[concept.token] = (images, maps, text)
    out: dict[str, dict] = {}
    for i, item in enumerate(inputs):
        marked = {x.token for x in item.sentence.concepts}
        source = fidelity.square_crop(item.image.convert("RGB"))
        size = (source.height, source.width)
        maps_file = bundle.attention_maps_file(i)
        maps = load_file(str(maps_file)) if maps_file.is_file() else {}
        for concept in record.concepts:
            if concept.token not in marked:
                continue
            if concept.token in item.masks:
                mask = fidelity.binary_mask(fidelity.square_crop(item.masks[concept.token]), size)
            elif concept.token in maps:
                mask = fidelity.attention_mask(maps[concept.token], size, threshold)
            else:
                continue
            images, gen_maps, text = generations[concept.token]
            item_samples = fidelity.ConceptSamples(concept.token, source, mask, images, gen_maps, text, threshold)
            values = fidelity.concept_fidelity(models, item_samples)
            if values:
                out.setdefault(f"image_{i}", {})[concept.token] = values
    return out
