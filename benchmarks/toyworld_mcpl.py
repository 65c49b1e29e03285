"""Is a learned concept *right*? MCPL variants measured in the toy world, where truth is known.

On two-object scenes built only from held-out colour-shape pairs (never seen in
pretraining), each object's shape word is replaced by a placeholder initialised from the
neutral word "object" (`a red <obj1|object|red> and a blue <obj2|object|blue>`), and these
variants learn the placeholders:

  separate   one concept at a time (plain textual inversion per object, its own phrase)
  mcpl_all   MCPL-all: every word of the sentence learnable
  mcpl_one   MCPL-one: the two placeholders
  attn_mask  + AttnMask
  prompt_cl  + AttnMask + PromptCL
  bind_adj   + AttnMask + PromptCL + Bind adj (the colour word): full MCPL

Per variant and concept:
  iou        thresholded attention of the learned token on the training image vs its object's mask
  recovery   the checker finds exactly one object, of the right shape, in "a <c>" generations and
             in "a <colour> <c>" generations (colour must be right too)
  share      disentanglement: share of the token's attention mass on its own object

    python benchmarks/toyworld_mcpl.py                      # full run: JSON, table, picture grid
    python benchmarks/toyworld_mcpl.py --scenes 4 --steps 20  # smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mcpl.concepts.metrics import attention_iou, attention_share  # noqa: E402
from mcpl.config import TrainConfig  # noqa: E402
from mcpl.job.run import image_attention_maps  # noqa: E402
from mcpl.method.inputs import JobInput
from mcpl.method.model_files import TOY_MODEL  # noqa: E402
from mcpl.method.models import load_components  # noqa: E402
from mcpl.method.trainer import MCPLTrainer  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "separate": {},
    "mcpl_all": {"strategy": "all"},
    "mcpl_one": {},
    "attn_mask": {"attn_mask": True},
    "prompt_cl": {"attn_mask": True, "prompt_cl": True},
    "bind_adj": {"attn_mask": True, "prompt_cl": True, "bind_adj": True},
}
CUTS = (0.2, 0.3, 0.5)


def heldout_scenes(n: int, seed: int = 1000) -> list:
    """n two-object scenes of held-out pairs (distinct colours and shapes by construction)."""
    from mcpl.toyworld.render import HELDOUT_PAIRS, render, sample_scene

    pairs = [(a, b) for i, a in enumerate(HELDOUT_PAIRS) for b in HELDOUT_PAIRS[i + 1:]]
    return [render(sample_scene(seed + k, forced=list(pairs[k % len(pairs)]))) for k in range(n)]


def phrases(rendered) -> list[tuple[str, str, str]]:
    """(token name, colour, shape) per object, in caption order."""
    return [(f"obj{k}", o.colour, o.shape) for k, o in enumerate(rendered.scene.objects, start=1)]


def phrase(name: str, colour: str, style: str) -> str:
    """One object's phrase: 'coloured' keeps the colour word (and binds it as the adjective);
    'bare' drops it, so nothing but the learned tokens can tell the two objects apart."""
    return f"a {colour} <{name}|object|{colour}>" if style == "coloured" else f"a <{name}|object>"


def sentence(objects: list[tuple[str, str, str]], style: str) -> str:
    return " and ".join(phrase(name, colour, style) for name, colour, _ in objects)


def variants(style: str) -> dict[str, dict]:
    """Bind adj needs an adjective in the sentence: not run on bare sentences."""
    return {k: v for k, v in VARIANTS.items() if style == "coloured" or not v.get("bind_adj")}


def learn(model: str, image: Image.Image, sentence: str, config: TrainConfig) -> tuple[dict, dict]:
    """Train one job in memory; return its learned vectors and per-token image maps."""
    components = load_components(model, "cpu")
    trainer = MCPLTrainer(components, [JobInput.from_text(image, sentence)], config, progress=False)
    vectors = trainer.train()
    maps = image_attention_maps(trainer, 0, config.map_timesteps)
    trainer.close()
    return vectors, maps


def assignment(maps: dict, tokens: list[str], masks: list[np.ndarray]) -> list[int]:
    """Bare sentences do not say which word is which object: pair words and objects
    one-to-one so that the total attention share on the paired objects is largest."""
    best = max(itertools.permutations(range(len(tokens))), key=lambda perm: sum(
        attention_share(maps[t], torch.from_numpy(masks[k])) for t, k in zip(tokens, perm, strict=True)))
    return list(best)


def recovery(pipe, checker, token: str, colour: str, shape: str, n: int, steps: int, seed: int) -> dict:
    from mcpl.concepts.generate import generate

    out = {}
    for key, prompt in (("plain", f"a {token}"), ("coloured", f"a {colour} {token}")):
        result = generate(pipe, prompt, [], num_images=n, steps=steps, guidance=5.0, seed=seed)
        hits = 0
        for img in result.images:
            found = checker.read(img)
            ok = len(found) == 1 and found[0].shape == shape and (key == "plain" or found[0].colour == colour)
            hits += ok
        out[key] = hits / n
        out[f"{key}_example"] = result.images[0]
    return out


def score_concepts(pipe, checker, maps: dict, rendered, style: str, n_images: int, sample_steps: int,
                   seed: int) -> tuple[dict, list]:
    """Per learned word (already loaded into `pipe`): IoU with its object and with the other,
    attention share, recovery; plus one plain generation per word for the pictures."""
    objects = phrases(rendered)
    tokens = [f"<{name}>" for name, _, _ in objects]
    order = assignment(maps, tokens, rendered.masks) if style == "bare" else list(range(len(tokens)))
    scores, samples = {}, []
    for token, index in zip(tokens, order, strict=True):
        _, colour, shape = objects[index]
        own = torch.from_numpy(rendered.masks[index])
        other = torch.from_numpy(next(m for j, m in enumerate(rendered.masks) if j != index))
        rec = recovery(pipe, checker, token, colour, shape, n_images, sample_steps, seed=seed)
        samples.append(rec["plain_example"])
        scores[token] = {
            **{f"iou@{cut}": attention_iou(maps[token], own, cut) for cut in CUTS},
            **{f"iou_other@{cut}": attention_iou(maps[token], other, cut) for cut in CUTS},
            "share": attention_share(maps[token], own),
            "recovery_plain": rec["plain"], "recovery_coloured": rec["coloured"], "object": index,
        }
    return scores, samples


def oracle(pipe, checker, objects: list[tuple[str, str, str]], n_images: int, sample_steps: int, seed: int) -> dict:
    """Recovery with the model's own shape word in place of a learned one: the ceiling."""
    out = {}
    for name, colour, shape in objects:
        rec = recovery(pipe, checker, shape, colour, shape, n_images, sample_steps, seed=seed)
        out[f"<{name}>"] = {"recovery_plain": rec["plain"], "recovery_coloured": rec["coloured"]}
    return out


def run_scene(args: tuple) -> dict:
    """All variants on one scene (one worker process, one thread)."""
    index, model, steps, n_images, sample_steps, lr, style, chosen = args
    torch.set_num_threads(1)
    from mcpl.concepts.generate import load_pipeline
    from mcpl.toyworld.checker import Checker

    checker = Checker.load()
    rendered = heldout_scenes(index + 1)[index]
    image = Image.fromarray(rendered.image)
    objects = phrases(rendered)
    full_sentence = sentence(objects, style)
    row = {"scene": index, "objects": [[c, s] for _, c, s in objects], "variants": {}}
    examples = {}
    for variant, fields in variants(style).items():
        if chosen and variant not in chosen:
            continue
        config = TrainConfig(**{"steps": steps, "seed": index, "learning_rate": lr, **fields})
        started = time.perf_counter()
        if variant == "separate":
            vectors, maps = {}, {}
            for name, colour, _ in objects:
                v, m = learn(model, image, phrase(name, colour, style), config)
                vectors.update(v)
                maps.update(m)
        else:
            vectors, maps = learn(model, image, full_sentence, config)
        pipe = load_pipeline(model, "cpu")
        tokens = [f"<{name}>" for name, _, _ in objects]
        for token in tokens:
            pipe.load_textual_inversion({token: vectors[token]}, token=token)
        per_concept, samples = score_concepts(pipe, checker, maps, rendered, style, n_images, sample_steps, index)
        examples[variant] = samples
        row["variants"][variant] = {"concepts": per_concept, "seconds": round(time.perf_counter() - started, 2),
                                    "maps": {t: maps[t].tolist() for t in tokens}}
    row["oracle"] = oracle(load_pipeline(model, "cpu"), checker, objects, n_images, sample_steps, index)
    row["examples"] = {k: [np.asarray(img).tolist() for img in v] for k, v in examples.items()} if index < 4 else {}
    row["image"] = rendered.image.tolist() if index < 4 else None
    return row


def summarise(rows: list[dict]) -> dict:
    out = {}
    for variant in rows[0]["variants"]:
        concepts = [c for r in rows for c in r["variants"][variant]["concepts"].values()]
        out[variant] = {key: round(statistics.mean(c[key] for c in concepts), 4)
                        for key in concepts[0] if key != "object"}
        out[variant]["recovery"] = round(statistics.mean(
            (c["recovery_plain"] + c["recovery_coloured"]) / 2 for c in concepts), 4)
        out[variant]["seconds_per_scene"] = round(statistics.mean(r["variants"][variant]["seconds"] for r in rows), 2)
    if all("oracle" in r for r in rows):
        concepts = [c for r in rows for c in r["oracle"].values()]
        out["oracle"] = {key: round(statistics.mean(c[key] for c in concepts), 4)
                         for key in ("recovery_plain", "recovery_coloured")}
        out["oracle"]["recovery"] = round((out["oracle"]["recovery_plain"] + out["oracle"]["recovery_coloured"]) / 2, 4)
    return out


def targets(summary: dict, cut: float) -> dict:
    """The issue's targets for full MCPL (bind_adj, or prompt_cl where no adjective exists)."""
    full = summary["bind_adj"] if "bind_adj" in summary else summary["prompt_cl"]
    iou = f"iou@{cut}"
    others = [other for other in ("mcpl_all", "separate") if other in summary]
    checks = {
        "full_iou>=0.6": full[iou] >= 0.6,
        "full_recovery>=0.9": full["recovery"] >= 0.9,
        **{f"full_{metric}-{other}>=0.15": round(full[metric] - summary[other][metric], 4) >= 0.15
           for other in others for metric in (iou, "recovery")},
    }
    margins = {f"{metric} full-{other}": round(full[metric] - summary[other][metric], 4)
               for other in others for metric in (iou, "recovery")}
    return {"met": checks, "margins": margins}


def picture(rows: list[dict], path: Path) -> None:
    """Per shown scene: the image, then each variant's two attention maps and a sample."""
    from mcpl.concepts.overlay import grid, overlay

    shown = [r for r in rows if r.get("image") is not None]
    lines, labels = [], []
    for r in shown:
        image = Image.fromarray(np.asarray(r["image"], dtype=np.uint8))
        for variant in r["variants"]:
            maps = r["variants"][variant]["maps"]
            panels = [image] + [overlay(image, torch.tensor(m)) for m in maps.values()]
            panels += [Image.fromarray(np.asarray(e, dtype=np.uint8)) for e in r["examples"].get(variant, [])]
            lines.append(panels)
            labels.append(f"scene {r['scene']} {variant}")
    grid(lines, labels).save(path)


def table(summary: dict, cut: float) -> str:
    head = f"| variant | IoU@{cut} | IoU other@{cut} | share | recovery (plain / coloured) | s/scene |"
    lines = [head, "|---|---|---|---|---|---|"]
    for variant, s in summary.items():
        if variant == "oracle":
            lines.append(f"| oracle (true shape word, no training) | – | – | – | "
                         f"{s['recovery_plain']:.0%} / {s['recovery_coloured']:.0%} | – |")
            continue
        lines.append(f"| {variant} | {s[f'iou@{cut}']:.2f} | {s[f'iou_other@{cut}']:.2f} | {s['share']:.2f} | "
                     f"{s['recovery_plain']:.0%} / {s['recovery_coloured']:.0%} | {s['seconds_per_scene']:.0f} |")
    return "\n".join(lines)


def targets_text(result: dict) -> str:
    met = ", ".join(f"{k}: {'met' if ok else 'not met'}" for k, ok in result["met"].items())
    margins = ", ".join(f"{k} {v:+.2f}" for k, v in result["margins"].items())
    return f"Targets: {met}.\nMargins: {margins}.\n"


def resolved_lr(model: str) -> float:
    """The learning rate a job on this model gets when none is given (its hint or the norm rule)."""
    from mcpl.method.trainer import default_learning_rate

    return default_learning_rate(load_components(model, "cpu"), TrainConfig().batch_size)


def summarise_partial(out: Path, args: argparse.Namespace) -> None:
    """Summary JSON + table from the scenes an interrupted run finished; says how many."""
    partial = out.with_suffix(".partial.jsonl")
    rows = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
    summary = summarise(rows)
    report = {"model": args.model, "scenes_finished": len(rows), "scenes_planned": args.scenes,
              "sentence": args.sentence, "steps": args.steps, "lr": args.lr, "images_per_prompt": args.images,
              "sample_steps": args.sample_steps, "cuts": CUTS, "partial": True, "summary": summary, "rows": rows}
    out.write_text(json.dumps(report, indent=1))
    note = f"\n{len(rows)} of {args.scenes} scenes (interrupted run; per-scene rows in {out.name})\n"
    out.with_suffix(".md").write_text(table(summary, args.cut) + note)
    print(table(summary, args.cut) + note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TOY_MODEL))
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=None, help="default: the model's")
    parser.add_argument("--images", type=int, default=2, help="generations per prompt for recovery")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--sentence", choices=("coloured", "bare"), default="coloured",
                        help="'a red <obj1> and a green <obj2>' or 'a <obj1> and a <obj2>'")
    parser.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), default=None,
                        help="run only these (default: all that the sentence style allows)")
    parser.add_argument("--cut", type=float, default=0.3, help="IoU threshold shown in the table")
    parser.add_argument("--out", default=str(RESULTS / "toyworld_mcpl.json"))
    parser.add_argument("--from-partial", action="store_true",
                        help="only summarise the scenes an interrupted run finished (<out>.partial.jsonl)")
    args = parser.parse_args()
    if args.from_partial:
        summarise_partial(Path(args.out), args)
        return
    started = time.time()
    jobs = [(i, args.model, args.steps, args.images, args.sample_steps, args.lr, args.sentence, args.variants)
            for i in range(args.scenes)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.jsonl")  # one line per finished scene: survives an interrupted run
    partial.write_text("")
    with ProcessPoolExecutor(args.workers) as pool:
        rows = []
        for row in pool.map(run_scene, jobs):
            rows.append(row)
            with partial.open("a") as fh:
                fh.write(json.dumps({"scene": row["scene"], "objects": row["objects"], "variants": {
                    v: {"concepts": d["concepts"], "seconds": d["seconds"]} for v, d in row["variants"].items()},
                    "oracle": row["oracle"]}) + "\n")
            print(f"scene {row['scene']}: " + ", ".join(
                f"{v} iou={statistics.mean(c['iou@0.3'] for c in d['concepts'].values()):.2f}"
                for v, d in row["variants"].items()), flush=True)
    summary = summarise(rows)
    picture(rows, out.with_suffix(".png"))
    for r in rows:
        r.pop("examples", None)
        r.pop("image", None)
        for v in r["variants"].values():
            v.pop("maps", None)
    report = {"model": args.model, "scenes": args.scenes, "sentence": args.sentence, "steps": args.steps,
              "lr": args.lr or resolved_lr(args.model), "images_per_prompt": args.images,
              "sample_steps": args.sample_steps, "cuts": CUTS, "wall_seconds": round(time.time() - started, 1),
              "summary": summary, "targets": targets(summary, args.cut), "rows": rows}
    out.write_text(json.dumps(report, indent=1))
    text = table(summary, args.cut) + "\n\n" + targets_text(report["targets"])
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')} in {report['wall_seconds']} s")


if __name__ == "__main__":
    main()
