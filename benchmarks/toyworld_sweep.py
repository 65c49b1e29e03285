"""Choose MCPL's open defaults in the toy world, on validation scenes the benchmark never uses.

Each stage compares a few training configurations on the same held-out-pair scenes (drawn
from seed 5000 on; `toyworld_mcpl.py` scores seeds 1000 on), measuring what the benchmark
measures: attention IoU of each learned token with its object's mask, IoU with the other
object, share of attention on its own object, and shape recovery in generations.

    python benchmarks/toyworld_sweep.py lr          # learning rate x steps (MCPL-one)
    python benchmarks/toyworld_sweep.py mask        # AttnMask: threshold k, mask source, layers
    python benchmarks/toyworld_sweep.py cl          # PromptCL: tau and lambda, Bind adj
    python benchmarks/toyworld_sweep.py steps       # does longer training help full MCPL more than MCPL-one?
    python benchmarks/toyworld_sweep.py oracle      # ceiling: the true shape word instead of a token

Writes benchmarks/results/toyworld_sweep_<stage>.json (+ a .md table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from toyworld_mcpl import RESULTS, heldout_scenes, learn, oracle, phrases, score_concepts, sentence  # noqa: E402

from mcpl.config import TrainConfig  # noqa: E402
from mcpl.method.model_files import TOY_MODEL  # noqa: E402

VALIDATION_SEED = 5000
FULL = {"attn_mask": True, "prompt_cl": True, "bind_adj": True}
STAGES: dict[str, dict[str, dict]] = {
    "lr": {
        f"lr{lr:g}_s{steps}": {"learning_rate": lr, "steps": steps}
        for lr in (1.2e-3, 3e-3, 5e-3, 1e-2) for steps in (40, 100)
    },
    "mask": {
        "none": {},
        **{f"k{k:g}_current": {"attn_mask": True, "mask_threshold": k} for k in (0.2, 0.3, 0.5)},
        **{f"k{k:g}_running": {"attn_mask": True, "mask_threshold": k, "mask_source": "running"}
           for k in (0.3, 0.5)},
        "k0.3_all_layers": {"attn_mask": True, "mask_threshold": 0.3, "attention_layers": ["attn2"]},
    },
    "cl": {
        "attn_mask": {"attn_mask": True},
        **{f"cl_tau{t:g}_w{w:g}": {"attn_mask": True, "prompt_cl": True, "cl_temperature": t, "cl_weight": w}
           for t, w in ((0.2, 5e-3), (0.2, 5e-2), (0.07, 5e-3), (0.07, 5e-2))},
        **{f"full_tau{t:g}_w{w:g}": {**FULL, "cl_temperature": t, "cl_weight": w}
           for t, w in ((0.2, 5e-3), (0.07, 5e-2))},
    },
    "steps": {f"{name}_s{steps}": {**fields, "steps": steps} for steps in (60, 150)
              for name, fields in (("mcpl_one", {}), ("full", FULL))},
    "oracle": {"oracle": {}},
}


def run_one(args: tuple) -> dict:
    """One configuration on one scene: metrics per concept."""
    name, fields, scene, base, n_images, sample_steps, style = args
    torch.set_num_threads(1)
    from mcpl.concepts.generate import load_pipeline
    from mcpl.toyworld.checker import Checker

    rendered = heldout_scenes(scene + 1, seed=VALIDATION_SEED)[scene]
    image = Image.fromarray(rendered.image)
    objects = phrases(rendered)
    started = time.perf_counter()
    pipe = load_pipeline(str(TOY_MODEL), "cpu")
    checker = Checker.load()
    out: dict = {"config": name, "scene": scene}
    if name == "oracle":
        out["concepts"] = oracle(pipe, checker, objects, n_images, sample_steps, scene)
        return out
    config = TrainConfig(**{**base, "seed": scene, **fields})
    vectors, maps = learn(str(TOY_MODEL), image, sentence(objects, style), config)
    for token in (f"<{n}>" for n, _, _ in objects):
        pipe.load_textual_inversion({token: vectors[token]}, token=token)
    out["concepts"], _ = score_concepts(pipe, checker, maps, rendered, style, n_images, sample_steps, scene)
    out["seconds"] = round(time.perf_counter() - started, 2)
    return out


def summarise(rows: list[dict]) -> dict:
    by_config: dict[str, list[dict]] = {}
    for row in rows:
        by_config.setdefault(row["config"], []).extend(row["concepts"].values())
    summary = {}
    for name, concepts in by_config.items():
        s = {key: round(statistics.mean(c[key] for c in concepts), 4) for key in concepts[0] if key != "object"}
        s["recovery"] = round((s["recovery_plain"] + s["recovery_coloured"]) / 2, 4)
        summary[name] = s
    return summary


def table(summary: dict) -> str:
    lines = ["| config | IoU@0.3 | IoU other@0.3 | share | recovery plain | coloured | mean |",
             "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        iou = f"{s['iou@0.3']:.2f} | {s['iou_other@0.3']:.2f} | {s['share']:.2f}" if "iou@0.3" in s else "– | – | –"
        lines.append(f"| {name} | {iou} | {s['recovery_plain']:.0%} | {s['recovery_coloured']:.0%} | "
                     f"{s['recovery']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--scenes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=None, help="default: the model's")
    parser.add_argument("--images", type=int, default=4, help="generations per prompt for recovery")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sentence", choices=("coloured", "bare"), default="coloured")
    args = parser.parse_args()
    base = {"steps": args.steps, **({"learning_rate": args.lr} if args.lr else {})}
    configs = {k: v for k, v in STAGES[args.stage].items() if args.sentence == "coloured" or not v.get("bind_adj")}
    jobs = [(name, fields, scene, base, args.images, args.sample_steps, args.sentence)
            for scene in range(args.scenes) for name, fields in configs.items()]
    suffix = "" if args.sentence == "coloured" else f"_{args.sentence}"
    out = RESULTS / f"toyworld_sweep_{args.stage}{suffix}.json"
    started = time.time()
    rows = []
    with ProcessPoolExecutor(args.workers) as pool:
        for row in pool.map(run_one, jobs):
            rows.append(row)
            print(f"{row['config']} scene {row['scene']}: " + json.dumps(
                {t: {k: round(v, 2) for k, v in c.items() if k in ("iou@0.3", "recovery_plain",
                                                                     "recovery_coloured")}
                 for t, c in row["concepts"].items()}), flush=True)
    summary = summarise(rows)
    report = {"stage": args.stage, "sentence": args.sentence, "scenes": args.scenes,
              "validation_seed": VALIDATION_SEED, "base": base,
              "images_per_prompt": args.images, "sample_steps": args.sample_steps,
              "configs": configs, "wall_seconds": round(time.time() - started, 1),
              "summary": summary, "rows": rows}
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(table(summary) + "\n")
    print(table(summary))
    print(f"wrote {out} in {report['wall_seconds']} s")


if __name__ == "__main__":
    main()
