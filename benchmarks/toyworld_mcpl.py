"""Benchmark v2: what does MCPL learn in the toy world, measured against the untrained and the true word.

Every scene is built only from held-out colour-shape pairs (never drawn in pretraining); each
object's shape word becomes a placeholder initialised from the word "object". Five modes:

  coloured   2 objects, `a red <obj1|object|red> and a green <obj2|object|green>`, objects listed in
             the fixed order of HELDOUT_PAIRS (v1's setting: a given pair is always first or always second)
  shuffled   the same sentences, object order balanced: each pair is first in half of its scenes
  bare       `a <obj1|object> and a <obj2|object>`, order balanced: only the learned words tell the
             objects apart, so each concept owns colour and shape; words are paired with objects
             one-to-one by attention share before scoring
  three      3 objects, coloured sentences, the six orders balanced
  diverse    one shared concept <x> in a group of 2-3 images (each with another held-out object),
             learned from the group (MCPL-diverse) vs from the first image alone

Rows of every table:
  untrained  the placeholder as initialised ("object"), 0 steps: what the sentence alone gives
  true       the placeholder initialised from the object's true shape word, 0 steps: the ceiling
  mcpl_all   MCPL-all (every word learnable)   mcpl_one   MCPL-one   full   + AttnMask + PromptCL
             (+ Bind adj where there is an adjective), the TrainConfig defaults otherwise
  diverse mode: mcpl_one / full on the first image, diverse / diverse_full on the whole group
  optional (--variants): separate (one concept at a time), attn_mask, prompt_cl

Per concept:
  recovery   share of G generations in which the checker finds exactly one object, of the concept's
             shape AND colour. Prompt: `a <colour> <c>` where the sentence gives the colour,
             `a <c>` in bare mode (the concept owns the colour). Same seeds for every variant (paired).
  shape      the same generations, shape only
  iou        the token's attention on its training image (8 noise levels, mean over heads and the
             model's localising layers), divided by its max, cut at 0.3, vs its object's mask;
             reported as gain over the untrained word on the same scene
Chance: the untrained word draws squares whatever the colour (no word of the toy vocabulary is
neutral: docs/TOYWORLD.md), so square concepts get recovery for free; the untrained row is the
chance of each pair and every variant is also shown as gain over it, with a chance-corrected
recovery (rec - chance) / (1 - chance). The untrained and true rows do not depend on the scene
(their words are fixed): they are sampled once per pair and prompt with --reference-images.

Intervals: 95 % t-intervals over scenes of the per-scene mean difference (concepts of one scene are
not independent), for every pair of variants in a mode. Scenes are a pure function of (mode,
index, --seed): seeds --seed + 500 * mode index + index (diverse: 4 seeds per group), so another
seed base is another held-out suite; validation (tuning) uses 5000+ (toyworld_sweep.py).

    python benchmarks/toyworld_mcpl.py                       # default run, all modes (23.6 min on 2 cores, 2026-12-01)
    python benchmarks/toyworld_mcpl.py --scenes 48 --out benchmarks/results/toyworld_mcpl_v2_48.json
    python benchmarks/toyworld_mcpl.py --quick --out /tmp/q.json   # CI smoke (< 2 min)
    python benchmarks/toyworld_mcpl.py --resume ...          # continue an interrupted run (its .partial.jsonl)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mcpl.concepts.metrics import attention_iou, attention_share  # noqa: E402
from mcpl.config import TrainConfig  # noqa: E402
from mcpl.method.model_files import TOY_MODEL  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODES = ("coloured", "shuffled", "bare", "three", "diverse")
SEED_BLOCK = 500  # scene seeds of mode m: seed + SEED_BLOCK * m + index (diverse: + 4 * index + image)
INIT = "object"
CUT = 0.3
FULL = {"attn_mask": True, "prompt_cl": True, "bind_adj": True}
# Not a TrainConfig field: "separate" trains one job per concept (its phrase alone).
PSEUDO_FIELDS = ("separate",)
TRAINED: dict[str, dict] = {  # TrainConfig fields on top of the defaults
    "separate": {"separate": True},
    "mcpl_all": {"strategy": "all"},
    "mcpl_one": {},
    "attn_mask": {"attn_mask": True},
    "prompt_cl": {"attn_mask": True, "prompt_cl": True},
    "full": FULL,
    "diverse": {"strategy": "diverse"},
    "diverse_full": {**FULL, "strategy": "diverse"},
}
DEFAULT_VARIANTS = {
    "coloured": ("mcpl_all", "mcpl_one", "full"),
    "shuffled": ("mcpl_all", "mcpl_one", "full"),
    "bare": ("mcpl_all", "mcpl_one", "full"),
    "three": ("mcpl_all", "mcpl_one", "full"),
    "diverse": ("mcpl_one", "full", "diverse", "diverse_full"),
}
REFERENCE_ROWS = ("untrained", "true")


# ------------------------------------------------------------------------------------------ scenes
@dataclass(frozen=True)
class Concept:
    """One evaluated concept: its token, true attributes, and where it is in the scene's images."""

    name: str  # placeholder name: "obj1", "x", ...
    colour: str
    shape: str
    objects: tuple[int, ...]  # per image of the scene: the object's index there (-1: absent)

    @property
    def token(self) -> str:
        return f"<{self.name}>"


@dataclass
class BenchScene:
    """A benchmark scene: one image (or a diverse group), sentences per image, evaluated concepts."""

    mode: str
    index: int
    seeds: list[int]
    rendered: list = field(repr=False)  # mcpl.toyworld.render.Rendered per image
    names: list[list[str]]  # per image: the placeholder name of each object, in caption order
    concepts: list[Concept]

    @property
    def seed(self) -> int:
        return self.seeds[0]

    @property
    def coloured(self) -> bool:
        return self.mode != "bare"

    def sentence(self, image: int, init: str | None = INIT, coloured: bool | None = None) -> str:
        """The image's training sentence; `init=None`: each placeholder starts from its true shape word."""
        coloured = self.coloured if coloured is None else coloured
        parts = []
        for name, obj in zip(self.names[image], self.rendered[image].scene.objects, strict=True):
            word = init or obj.shape
            parts.append(f"a {obj.colour} <{name}|{word}|{obj.colour}>" if coloured else f"a <{name}|{word}>")
        return " and ".join(parts)

    def phrase(self, image: int, k: int) -> str:
        """One object's phrase alone (the `separate` variant)."""
        return self.sentence(image).split(" and ")[k]

    def prompt(self, concept: Concept, token: str) -> str:
        """The recovery prompt: the colour word where the sentence gives it, else the token alone."""
        return f"a {concept.colour} {token}" if self.coloured else f"a {token}"

    def describe(self) -> dict:
        return {"mode": self.mode, "index": self.index, "seeds": self.seeds,
                "sentences": [self.sentence(i) for i in range(len(self.seeds))],
                "concepts": [asdict(c) for c in self.concepts]}


def _pairs():
    from mcpl.toyworld.render import HELDOUT_PAIRS

    return list(HELDOUT_PAIRS)


def scene_layout(mode: str, index: int) -> list[list[tuple[str, str]]]:
    """Per image, the (colour, shape) pairs in caption order: a pure function of mode and index.

    Two objects: the 6 combinations of held-out pairs in turn; `coloured` keeps HELDOUT_PAIRS' order,
    the other modes reverse it in every second block of 6 (each pair first in half of its scenes).
    Three objects: the 4 combinations x the 6 orders (balanced over 24 scenes). Diverse: shared pair
    index % 4, group of 2 (even blocks of 4) or 3 images, companions rotated, the shared object first
    in alternate images.
    """
    held = _pairs()
    if mode in ("coloured", "shuffled", "bare"):
        combos = list(itertools.combinations(held, 2))
        pair = list(combos[index % len(combos)])
        if mode != "coloured" and (index // len(combos)) % 2:
            pair.reverse()
        return [pair]
    if mode == "three":
        combos = list(itertools.combinations(held, 3))
        orders = list(itertools.permutations(range(3)))
        combo = combos[index % len(combos)]
        order = orders[(index // len(combos)) % len(orders)]
        return [[combo[i] for i in order]]
    if mode == "diverse":
        shared = held[index % len(held)]
        others = [p for p in held if p != shared]
        size = 2 + (index // len(held)) % 2
        start = (index // (2 * len(held))) % len(others)
        companions = (others[start:] + others[:start])[:size]
        return [[shared, c] if (j + index) % 2 == 0 else [c, shared] for j, c in enumerate(companions)]
    raise ValueError(f"unknown mode {mode!r}")


def scene_seeds(mode: str, index: int, seed: int = 1000) -> list[int]:
    """The renderer seeds of a scene: mode m's scenes use seed + SEED_BLOCK * m + index (diverse:
    + 4 * index + image), so modes never share a scene and seed bases 1000 and 5000 never meet."""
    if not 0 <= index < SEED_BLOCK // 4:
        raise ValueError(f"at most {SEED_BLOCK // 4} scenes per mode")
    base = seed + SEED_BLOCK * MODES.index(mode)
    if mode == "diverse":
        return [base + 4 * index + j for j in range(len(scene_layout(mode, index)))]
    return [base + index]


def make_scene(mode: str, index: int, seed: int = 1000) -> BenchScene:
    """Benchmark scene `index` of `mode` for seed base `seed` (renderer and sample_scene only)."""
    from mcpl.toyworld.render import render, sample_scene

    layout = scene_layout(mode, index)
    seeds = scene_seeds(mode, index, seed)
    rendered = [render(sample_scene(s, forced=list(objs))) for s, objs in zip(seeds, layout, strict=True)]
    if mode == "diverse":
        shared = layout[0][0] if layout[0][0] in layout[1] else layout[0][1]
        names, k = [], 0
        for objs in layout:
            row = []
            for pair in objs:
                if pair == shared:
                    row.append("x")
                else:
                    k += 1
                    row.append(f"b{k}")
            names.append(row)
        concepts = [Concept("x", *shared, tuple(row.index("x") for row in names))]
    else:
        names = [[f"obj{k}" for k in range(1, len(layout[0]) + 1)]]
        concepts = [Concept(n, c, s, (k,)) for k, (n, (c, s)) in enumerate(zip(names[0], layout[0], strict=True))]
    return BenchScene(mode, index, seeds, rendered, names, concepts)


# ----------------------------------------------------------------------------------------- scoring
def recovery_of(checker, images, colour: str, shape: str) -> dict:
    """exact: one object, right shape and colour; shape: one object, right shape; drawn: shapes read."""
    exact = shape_ok = 0
    drawn: dict[str, int] = {}
    for img in images:
        found = checker.read(img)
        key = found[0].shape if len(found) == 1 else f"{len(found)} objects"
        drawn[key] = drawn.get(key, 0) + 1
        if len(found) == 1 and found[0].shape == shape:
            shape_ok += 1
            exact += found[0].colour == colour
    n = max(1, len(images))
    return {"recovery": exact / n, "shape": shape_ok / n, "drawn": drawn}


def assignment(maps: dict, tokens: list[str], masks: list[np.ndarray]) -> list[int]:
    """Bare sentences do not say which word is which object: pair words and objects one-to-one so
    that the total attention share on the paired objects is largest."""
    best = max(itertools.permutations(range(len(masks)), len(tokens)), key=lambda perm: sum(
        attention_share(maps[t], torch.from_numpy(masks[k])) for t, k in zip(tokens, perm, strict=True)))
    return list(best)


def map_scores(scene: BenchScene, maps: dict, concept: Concept, obj: int, image: int = 0) -> dict:
    masks = scene.rendered[image].masks
    own = torch.from_numpy(masks[obj])
    others = [torch.from_numpy(m) for j, m in enumerate(masks) if j != obj]
    attention = maps[concept.token]
    return {"iou": attention_iou(attention, own, CUT),
            "iou_other": max(attention_iou(attention, o, CUT) for o in others),
            "share": attention_share(attention, own)}


def objects_of(scene: BenchScene, maps: dict) -> list[int]:
    """Which object of image 0 each evaluated concept is scored against (bare: by attention)."""
    if scene.mode != "bare":
        return [c.objects[0] for c in scene.concepts]
    return assignment(maps, [c.token for c in scene.concepts], scene.rendered[0].masks)


def generation_seed(scene: BenchScene, k: int) -> int:
    """The same seeds for every variant of a concept: paired comparisons."""
    return scene.seed * 16 + k


# ------------------------------------------------------------------------------------------ worker
_STATE: dict = {}


def _init_worker(model: str, checker_dir: str | None) -> None:
    torch.set_num_threads(1)
    from mcpl.method.models import load_components
    from mcpl.toyworld.checker import Checker

    _STATE["components"] = load_components(model, "cpu")
    _STATE["checker"] = Checker.load(checker_dir) if checker_dir else Checker.load()


def variant_config(fields: dict, scene: BenchScene, settings: dict) -> TrainConfig:
    """A variant's TrainConfig: the defaults, the run's steps/lr/--set, the variant's own fields."""
    fields = {k: v for k, v in fields.items() if k not in PSEUDO_FIELDS}
    if not scene.coloured:
        fields.pop("bind_adj", None)  # no adjective to bind
    base = {"steps": settings["steps"], "seed": scene.seed, **settings.get("overrides", {})}
    if settings.get("lr"):
        base["learning_rate"] = settings["lr"]
    return TrainConfig(**{**base, **fields})


def _jobs(scene: BenchScene, fields: dict, settings: dict) -> list[tuple[list[int], list[str], TrainConfig]]:
    """(images, sentences, config) of each job a variant trains on a scene."""
    config = variant_config(fields, scene, settings)
    if fields.get("strategy") == "diverse":
        return [(list(range(len(scene.seeds))), [scene.sentence(i) for i in range(len(scene.seeds))], config)]
    if fields.get("separate"):
        return [([0], [scene.phrase(0, k)], config) for k in range(len(scene.names[0]))]
    return [([0], [scene.sentence(0)], config)]


def sampling_components(components):
    """The components with a private copy of the text encoder for sampling: diffusers'
    load_textual_inversion resizes the embedding table in place, which borrowed_pipeline does not
    undo, and the next pack's trainers need the original table."""
    import copy
    import dataclasses

    return dataclasses.replace(components, stacks=[dataclasses.replace(st, encoder=copy.deepcopy(st.encoder))
                                                   for st in components.stacks])


def _attributes(scene: BenchScene, obj: int) -> dict:
    """The (colour, shape) of image 0's object `obj`: what a concept scored against it must be."""
    o = scene.rendered[0].scene.objects[obj]
    return {"colour": o.colour, "shape_true": o.shape}


def run_unit(unit: dict) -> dict:
    """Train and score every variant of a few scenes of one mode: one pack, one UNet call per step."""
    from mcpl.concepts.generate import borrowed_pipeline, generate
    from mcpl.job.run import image_attention_maps
    from mcpl.method.inputs import JobInput
    from mcpl.method.packing import PackedJob, PackedTrainer
    from mcpl.method.trainer import MCPLTrainer

    components, checker = _STATE["components"], _STATE["checker"]
    settings = unit["settings"]
    scenes = [make_scene(unit["mode"], i, settings["seed"]) for i in unit["scenes"]]
    started, cpu = time.perf_counter(), time.process_time()
    # 0-step rows: attention of the untrained and of the true word on each scene
    rows: dict[int, dict] = {s.index: {**s.describe(), "variants": {}} for s in scenes}
    for s in scenes:
        for ref, init in (("untrained", INIT), ("true", None)):
            inputs = [JobInput.from_text(Image.fromarray(s.rendered[0].image), s.sentence(0, init, coloured=True
                                                                                          if ref == "true" else None))]
            trainer = MCPLTrainer(components, inputs, TrainConfig(steps=1, seed=s.seed), progress=False)
            maps = image_attention_maps(trainer, 0, settings["map_timesteps"])
            trainer.close()
            objs = [c.objects[0] for c in s.concepts] if ref == "true" else objects_of(s, maps)
            rows[s.index]["variants"][ref] = {"concepts": {
                c.token: {**map_scores(s, maps, c, o), "object": o, **_attributes(s, o)}
                for c, o in zip(s.concepts, objs, strict=True)}}
    # trained variants, all in one pack
    plan = []
    for s in scenes:
        for variant, fields in unit["variants"].items():
            for images, sentences, config in _jobs(s, fields, settings):
                inputs = [JobInput.from_text(Image.fromarray(s.rendered[i].image), t)
                          for i, t in zip(images, sentences, strict=True)]
                plan.append((s, variant, PackedJob(inputs, config)))
    pack_started = time.perf_counter()
    packed = PackedTrainer(components, [job for _, _, job in plan]) if plan else None
    results = packed.train() if packed else []
    train_seconds = time.perf_counter() - pack_started
    learned: dict[tuple[int, str], dict] = {}
    for (s, variant, _), trainer, vectors in zip(plan, packed.trainers if packed else [], results, strict=True):
        if isinstance(vectors, BaseException):
            raise vectors
        maps = image_attention_maps(trainer, 0, settings["map_timesteps"])
        entry = learned.setdefault((s.index, variant), {"vectors": {}, "maps": {}})
        entry["vectors"].update(vectors)
        entry["maps"].update(maps)
        entry["history"] = trainer.history[-1] if trainer.history else {}
    if packed:
        packed.close()
    # generations: every trained concept, same seeds across variants
    gen_started = time.perf_counter()
    with borrowed_pipeline(sampling_components(components)) as pipe:
        for s in scenes:
            for variant in unit["variants"]:
                entry = learned[(s.index, variant)]
                objs = objects_of(s, entry["maps"])
                scores = {}
                for k, (c, o) in enumerate(zip(s.concepts, objs, strict=True)):
                    token = f"<u{s.index}{variant.replace('_', '')}{c.name}>"
                    pipe.load_textual_inversion({token: entry["vectors"][c.token][0]}, token=token)
                    attributes = _attributes(s, o)
                    colour, shape = attributes["colour"], attributes["shape_true"]
                    images = generate(pipe, s.prompt(Concept(c.name, colour, shape, c.objects), token), [],
                                      num_images=settings["images"], steps=settings["sample_steps"],
                                      guidance=settings["guidance"], seed=generation_seed(s, k)).images
                    scores[c.token] = {**map_scores(s, entry["maps"], c, o), "object": o, **attributes,
                                       "position": s.names[0].index(c.name) if c.name in s.names[0] else -1,
                                       **recovery_of(checker, images, colour, shape)}
                    if s.index == 0 and k == 0:
                        entry["example"] = np.asarray(images[0]).tolist()
                rows[s.index]["variants"][variant] = {"concepts": scores, "last_logs": entry["history"]}
    out = {"mode": unit["mode"], "scenes": unit["scenes"], "variants": unit["variants"],
           "rows": [rows[s.index] for s in scenes],
           "wall_seconds": round(time.perf_counter() - started, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
           "train_seconds": round(train_seconds, 1), "generate_seconds": round(time.perf_counter() - gen_started, 1),
           "jobs": len(plan)}
    if unit["scenes"][0] == 0:
        s = scenes[0]
        out["picture"] = {"image": s.rendered[0].image.tolist(),
                          "maps": {v: {t: m.tolist() for t, m in learned[(0, v)]["maps"].items()
                                       if t in {c.token for c in s.concepts}} for v in unit["variants"]},
                          "examples": {v: learned[(0, v)].get("example") for v in unit["variants"]}}
    return out


def run_references(settings: dict) -> dict:
    """Recovery of the untrained and the true word per pair and prompt kind: they do not depend on the
    scene, so they are sampled once, with more images. Also which shapes the untrained word draws."""
    from mcpl.concepts.generate import borrowed_pipeline, generate

    components, checker = _STATE["components"], _STATE["checker"]
    started = time.perf_counter()
    n = settings["reference_images"]
    out: dict = {"untrained": {}, "true": {}}
    with borrowed_pipeline(sampling_components(components)) as pipe:
        for k, (colour, shape) in enumerate(_pairs()):
            for kind in ("coloured", "bare"):
                prompt = f"a {colour} {INIT}" if kind == "coloured" else f"a {INIT}"
                images = generate(pipe, prompt, [], num_images=n, steps=settings["sample_steps"],
                                  guidance=settings["guidance"], seed=settings["seed"] * 16 + 7 * k + (kind == "bare"),
                                  ).images
                out["untrained"][f"{kind}:{colour} {shape}"] = recovery_of(checker, images, colour, shape)
            images = generate(pipe, f"a {colour} {shape}", [], num_images=n, steps=settings["sample_steps"],
                              guidance=settings["guidance"], seed=settings["seed"] * 16 + 7 * k + 3).images
            out["true"][f"{colour} {shape}"] = recovery_of(checker, images, colour, shape)
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    return out


# --------------------------------------------------------------------------------------- statistics
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 12: 2.18,
        15: 2.13, 20: 2.09, 25: 2.06, 30: 2.04, 40: 2.02, 60: 2.00, 120: 1.98}


def t975(df: int) -> float:
    """Two-sided 95 % Student t quantile (table, conservative between entries)."""
    if df <= 0:
        return math.nan
    return T975[max(k for k in T975 if k <= df)] if df < 120 else 1.96


def interval(values: list[float]) -> dict:
    """Mean and 95 % t half-width of per-scene values."""
    n = len(values)
    mean = statistics.fmean(values) if values else math.nan
    half = t975(n - 1) * statistics.stdev(values) / math.sqrt(n) if n > 1 else math.nan
    return {"mean": round(mean, 4), "half": round(half, 4), "n": n}


def concept_value(row: dict, variant: str, token: str, metric: str, references: dict, mode: str) -> float:
    """A concept's metric in a variant; the 0-step rows take recovery from the reference sampling."""
    c = row["variants"][variant]["concepts"][token]
    if metric in ("recovery", "shape") and variant in REFERENCE_ROWS:
        key = f"{c['colour']} {c['shape_true']}"
        if variant == "untrained":
            key = f"{'bare' if mode == 'bare' else 'coloured'}:{key}"
        return references[variant][key][metric]
    return c[metric]


def scene_mean(row: dict, variant: str, metric: str, references: dict, mode: str) -> float:
    tokens = list(row["variants"][variant]["concepts"])
    return statistics.fmean(concept_value(row, variant, t, metric, references, mode) for t in tokens)


def summarise(rows: list[dict], references: dict, mode: str) -> dict:
    """Per variant: means with intervals, gains over the untrained word; paired differences."""
    variants = [v for v in rows[0]["variants"]]
    out: dict = {"scenes": len(rows), "concepts": sum(len(r["concepts"]) for r in rows), "variants": {},
                 "differences": {}}
    for v in variants:
        s: dict = {}
        for metric in ("recovery", "shape", "iou", "iou_other", "share"):
            s[metric] = interval([scene_mean(r, v, metric, references, mode) for r in rows])
        for metric in ("recovery", "iou"):
            s[f"{metric}_gain"] = interval([scene_mean(r, v, metric, references, mode)
                                            - scene_mean(r, "untrained", metric, references, mode) for r in rows])
        chance = statistics.fmean(scene_mean(r, "untrained", "recovery", references, mode) for r in rows)
        s["chance_corrected"] = round((s["recovery"]["mean"] - chance) / (1 - chance), 4) if chance < 1 else None
        out["variants"][v] = s
    trained = [v for v in variants if v not in REFERENCE_ROWS]
    for v in trained:  # the word's place in the sentence: the first word sees only "a (colour)" before it
        by_position: dict[int, list[float]] = {}
        for r in rows:
            for c in r["variants"][v]["concepts"].values():
                by_position.setdefault(c.get("position", -1), []).append(c["recovery"])
        out["variants"][v]["recovery_by_position"] = {str(k): round(statistics.fmean(x), 4)
                                                      for k, x in sorted(by_position.items())}
    for a, b in itertools.combinations(trained, 2):
        for metric in ("recovery", "iou"):
            out["differences"][f"{metric}: {b} - {a}"] = interval(
                [scene_mean(r, b, metric, references, mode) - scene_mean(r, a, metric, references, mode)
                 for r in rows])
    return out


def chance_per_shape(references: dict) -> dict:
    """What the untrained word draws: share of each shape (or count) per colour and prompt kind."""
    return {k: v["drawn"] for k, v in references["untrained"].items()}


# ------------------------------------------------------------------------------------------ output
def fmt(iv: dict, pct: bool = True) -> str:
    if iv["mean"] != iv["mean"]:
        return "–"
    if pct:
        return f"{100 * iv['mean']:.0f}" + (f" ± {100 * iv['half']:.0f}" if iv["half"] == iv["half"] else "")
    return f"{iv['mean']:.2f}" + (f" ± {iv['half']:.2f}" if iv["half"] == iv["half"] else "")


def fmt_signed(iv: dict, pct: bool = True) -> str:
    if iv["mean"] != iv["mean"]:
        return "–"
    k = 100 if pct else 1
    mean = f"{k * iv['mean']:+.0f}" if pct else f"{iv['mean']:+.2f}"
    half = (f" ± {k * iv['half']:.0f}" if pct else f" ± {iv['half']:.2f}") if iv["half"] == iv["half"] else ""
    return mean + half


def mode_table(mode: str, summary: dict) -> str:
    lines = [f"**{mode}** ({summary['scenes']} scenes, {summary['concepts']} concepts)", "",
             "| row | recovery % | gain over untrained | chance-corr. | shape % | IoU@0.3 | IoU gain | "
             "IoU other | share |", "|---|---|---|---|---|---|---|---|---|"]
    for v, s in summary["variants"].items():
        cc = "–" if s["chance_corrected"] is None or v == "untrained" else f"{s['chance_corrected']:.2f}"
        gain = "–" if v == "untrained" else fmt_signed(s["recovery_gain"])
        iou_gain = "–" if v == "untrained" else fmt_signed(s["iou_gain"], pct=False)
        lines.append(f"| {v} | {fmt(s['recovery'])} | {gain} | {cc} | {fmt(s['shape'])} | "
                     f"{fmt(s['iou'], pct=False)} | {iou_gain} | {s['iou_other']['mean']:.2f} | "
                     f"{s['share']['mean']:.2f} |")
    positions = [(v, s["recovery_by_position"]) for v, s in summary["variants"].items() if "recovery_by_position" in s]
    if positions and len(positions[0][1]) > 1:
        lines += ["", "Recovery by the word's place in the sentence (1st / 2nd / 3rd): " + "; ".join(
            f"{v} " + " / ".join(f"{100 * x:.0f}" for x in p.values()) for v, p in positions) + "."]
    lines += ["", "| paired difference (95 % interval over scenes) | recovery points | IoU |", "|---|---|---|"]
    seen = sorted({k.split(": ", 1)[1] for k in summary["differences"]})
    for pair in seen:
        rec, iou = summary["differences"][f"recovery: {pair}"], summary["differences"][f"iou: {pair}"]
        excl = " (excludes 0)" if abs(rec["mean"]) > rec["half"] else ""
        lines.append(f"| {pair} | {fmt_signed(rec)}{excl} | {fmt_signed(iou, pct=False)} |")
    return "\n".join(lines)


def reference_table(references: dict) -> str:
    lines = ["| pair | true word: recovery % | untrained, coloured prompt: recovery % (drawn) | "
             "untrained, bare prompt: recovery % (drawn) |", "|---|---|---|---|"]
    for colour, shape in _pairs():
        key = f"{colour} {shape}"
        cells = [f"{100 * references['true'][key]['recovery']:.0f}"]
        for kind in ("coloured", "bare"):
            r = references["untrained"][f"{kind}:{key}"]
            drawn = ", ".join(f"{k} {n}" for k, n in sorted(r["drawn"].items(), key=lambda x: -x[1]))
            cells.append(f"{100 * r['recovery']:.0f} ({drawn})")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def picture(units: list[dict], path: Path) -> None:
    """Per mode, scene 0: the image, each variant's concept maps and its first concept's first generation."""
    from mcpl.concepts.overlay import grid, overlay

    lines, labels = [], []
    for unit in units:
        pic = unit.get("picture")
        if not pic:
            continue
        image = Image.fromarray(np.asarray(pic["image"], dtype=np.uint8))
        for v, maps in pic["maps"].items():
            panels = [image] + [overlay(image, torch.tensor(m)) for m in maps.values()]
            if pic["examples"].get(v) is not None:
                panels.append(Image.fromarray(np.asarray(pic["examples"][v], dtype=np.uint8)))
            lines.append(panels)
            labels.append(f"{unit['mode']} {v}")
    if lines:
        grid(lines, labels).save(path)


def report_text(report: dict) -> str:
    s = report["settings"]
    head = (f"Toy-world MCPL benchmark v2: {s['steps']} steps, lr {report['lr']}, {s['images']} generations per "
            f"concept (DDIM {s['sample_steps']}, CFG {s['guidance']}), references {s['reference_images']} "
            f"per pair, seed base {s['seed']}; {report.get('wall_seconds', '?')} s wall"
            + (" (partial)" if report.get("partial") else "") + ".\n")
    parts = [head, "Untrained and true word per pair (sampled once; they do not depend on the scene):", "",
             reference_table(report["references"]), ""]
    for mode, summary in report["summary"].items():
        parts += [mode_table(mode, summary), ""]
    return "\n".join(parts)


# -------------------------------------------------------------------------------------------- main
def allowed(mode: str, fields: dict) -> bool:
    """Group variants only in diverse mode; MCPL-all and separate only where every concept is scored."""
    if mode == "diverse":
        return fields.get("strategy") != "all" and not fields.get("separate")
    return fields.get("strategy") != "diverse"


def plan_units(modes: list[str], scenes: int, per_unit: int, variants: dict[str, dict[str, dict]]) -> list[dict]:
    """Work units (a few scenes of one mode each), modes interleaved so a partial run covers all."""
    chunks = {m: [list(range(i, min(scenes, i + per_unit))) for i in range(0, scenes, per_unit)] for m in modes}
    units = []
    for k in range(max(len(c) for c in chunks.values())):
        for m in modes:
            if k < len(chunks[m]):
                units.append({"mode": m, "scenes": chunks[m][k], "variants": variants[m]})
    return units


def resolved_lr(model: str) -> float:
    from mcpl.method.models import load_components
    from mcpl.method.trainer import default_learning_rate

    return default_learning_rate(load_components(model, "cpu"), TrainConfig().batch_size)


def build_report(settings: dict, references: dict, units: list[dict], model: str, wall: float | None,
                 partial: bool) -> dict:
    by_mode: dict[str, list[dict]] = {}
    for u in units:
        by_mode.setdefault(u["mode"], []).extend(u["rows"])
    summary = {m: summarise(sorted(rows, key=lambda r: r["index"]), references, m)
               for m, rows in ((m, by_mode[m]) for m in MODES if m in by_mode)}
    return {"version": 2, "model": model, "lr": settings.get("lr") or resolved_lr(model), "settings": settings,
            "config_defaults": TrainConfig().model_dump(), "partial": partial, "wall_seconds": wall,
            "cpu_seconds": round(sum(u["cpu_seconds"] for u in units), 1),
            "train_seconds": round(sum(u["train_seconds"] for u in units), 1),
            "generate_seconds": round(sum(u["generate_seconds"] for u in units), 1),
            "references": references, "chance_per_shape": chance_per_shape(references), "summary": summary,
            "rows": {m: sorted(by_mode[m], key=lambda r: r["index"]) for m in by_mode}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TOY_MODEL))
    parser.add_argument("--checker", default=None, help="checker folder (default: the toy world's)")
    parser.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    parser.add_argument("--scenes", type=int, default=12, help="scenes per mode")
    parser.add_argument("--seed", type=int, default=1000, help="scene seed base (validation: 5000)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=None, help="default: the model's")
    parser.add_argument("--images", type=int, default=8, help="generations per concept and variant")
    parser.add_argument("--reference-images", type=int, default=32, help="generations per pair, 0-step rows")
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--map-timesteps", type=int, default=8)
    parser.add_argument("--per-unit", type=int, default=4, help="scenes per pack (one UNet call per step)")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--variants", nargs="*", choices=sorted(TRAINED), default=None,
                        help="trained variants (default per mode; the untrained and true rows always run)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="TrainConfig fields for every trained variant (e.g. cl_weight=0.01)")
    parser.add_argument("--out", default=str(RESULTS / "toyworld_mcpl.json"))
    parser.add_argument("--resume", action="store_true", help="keep finished units of <out>.partial.jsonl")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke: 1 scene per mode, 2 steps, 1 generation, 2 DDIM steps, 1 worker")
    args = parser.parse_args(argv)
    if args.quick:
        args.scenes, args.steps, args.images, args.reference_images = 1, 2, 1, 1
        args.sample_steps, args.map_timesteps, args.workers, args.per_unit = 2, 1, 1, 1
    return args


def settings_of(args: argparse.Namespace, overrides: dict | None = None) -> dict:
    from mcpl.config import parse_overrides

    return {"seed": args.seed, "steps": args.steps, "lr": args.lr, "images": args.images,
            "reference_images": args.reference_images, "sample_steps": args.sample_steps,
            "guidance": args.guidance, "map_timesteps": args.map_timesteps,
            "overrides": overrides if overrides is not None else parse_overrides(args.set)}


def unit_key(unit: dict) -> str:
    return json.dumps([unit["mode"], unit["scenes"], unit["variants"]], sort_keys=True)


def run(args: argparse.Namespace, units: list[dict], settings: dict, out: Path, log=print) -> tuple[dict, list]:
    """References + units on `args.workers` processes; finished units are appended to <out>.partial.jsonl."""
    partial = out.with_suffix(".partial.jsonl")
    key = json.dumps(settings, sort_keys=True)
    done: dict[str, dict] = {}
    references = None
    if args.resume and partial.exists():
        lines = [json.loads(x) for x in partial.read_text().splitlines() if x.strip()]
        if lines and lines[0].get("settings_key") == key:
            for line in lines[1:]:
                if "references" in line:
                    references = line["references"]
                else:
                    done[unit_key(line)] = line
        else:
            log("partial results were made with other settings: starting again")
            done, references = {}, None
    if not done and references is None:
        partial.write_text(json.dumps({"settings_key": key}) + "\n")
    todo = [u for u in units if unit_key(u) not in done]
    finished = [done[unit_key(u)] for u in units if unit_key(u) in done]
    with ProcessPoolExecutor(args.workers, initializer=_init_worker, initargs=(args.model, args.checker)) as pool:
        ref_future = pool.submit(run_references, settings) if references is None else None
        futures = [pool.submit(run_unit, {**u, "settings": settings}) for u in todo]
        if ref_future is not None:
            references = ref_future.result()
            with partial.open("a") as fh:
                fh.write(json.dumps({"references": references}) + "\n")
            log(f"references done in {references['wall_seconds']} s")
        for future in futures:
            result = future.result()
            finished.append(result)
            with partial.open("a") as fh:
                fh.write(json.dumps(result) + "\n")
            rates = {v: statistics.fmean(c["recovery"] for r in result["rows"]
                                         for c in r["variants"][v]["concepts"].values()) for v in result["variants"]}
            log(f"{result['mode']} scenes {result['scenes']}: {result['wall_seconds']} s "
                f"(train {result['train_seconds']} s, {result['jobs']} jobs; generate {result['generate_seconds']} s) "
                + ", ".join(f"{v} {100 * r:.0f} %" for v, r in rates.items()), flush=True)
    return references, finished


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.scenes > SEED_BLOCK // 4:
        raise SystemExit(f"--scenes: at most {SEED_BLOCK // 4} per mode")
    variants = {m: {v: TRAINED[v] for v in (args.variants or DEFAULT_VARIANTS[m]) if allowed(m, TRAINED[v])}
                for m in args.modes}
    settings = settings_of(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    units = plan_units(args.modes, args.scenes, args.per_unit, variants)
    references, finished = run(args, units, settings, out)
    report = build_report(settings, references, finished, args.model, round(time.time() - started, 1), False)
    picture(finished, out.with_suffix(".png"))
    out.write_text(json.dumps(report, indent=1))
    text = report_text(report)
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')} in {report['wall_seconds']} s")


if __name__ == "__main__":
    main()
