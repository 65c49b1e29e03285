"""The toy model's ceiling for the MCPL benchmark: its own words for the held-out pairs.

    python -m mcpl.toyworld.ceiling --model models/toyworld      # ~1.5 min on 1 thread

The benchmark's "oracle" row: prompts `a <shape>` and `a <colour> <shape>` for the four
held-out colour-shape pairs, DDIM 20 steps, CFG 5 (the gates' sampler, same model and
schedule as `mcpl.concepts.generate`), judged by the checker: exactly one object, of the
right shape (plain) and also of the right colour (coloured). Reports per pair and in total,
with 95 % Wilson intervals; writes benchmarks/results/toyworld_ceiling.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mcpl.toyworld.render import HELDOUT_PAIRS  # noqa: E402

SEED0 = 50_000


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95 % Wilson score interval of a proportion k/n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(max(0.0, c - h), 4), round(min(1.0, c + h), 4)]


def rate(k: int, n: int) -> dict:
    return {"hits": k, "n": n, "rate": k / max(1, n), "ci95": wilson(k, n)}


def judge(found, colour: str, shape: str, coloured: bool) -> bool:
    return len(found) == 1 and found[0].shape == shape and (not coloured or found[0].colour == colour)


def run_ceiling(model_dir: str, seeds: int = 32, steps: int = 20, guidance: float = 5.0, batch: int = 64,
                checker_dir: str | None = None, seed0: int = SEED0) -> dict:
    from mcpl.toyworld import checker as C
    from mcpl.toyworld.gates import ToyModel

    t0 = time.time()
    model = ToyModel(model_dir)
    chk = C.Checker.load(checker_dir or C.DEFAULT_DIR)
    jobs = []  # (pair, coloured, seed)
    for pair in HELDOUT_PAIRS:
        for coloured in (False, True):
            jobs += [(pair, coloured, seed0 + s) for s in range(seeds)]
    outcomes, failures = [], {}
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        prompts = [f"a {c} {s}" if col else f"a {s}" for (c, s), col, _ in chunk]
        imgs, _ = model.sample(prompts, [seed for _, _, seed in chunk], steps, guidance)
        for ((c, s), col, seed), img, prompt in zip(chunk, imgs, prompts, strict=True):
            found = chk.read(img)
            ok = judge(found, c, s, col)
            outcomes.append(((c, s), col, ok))
            if not ok:
                seen = " + ".join(f"{f.colour} {f.shape}" for f in found) or "nothing"
                failures.setdefault(prompt, {}).setdefault(seen, []).append(seed)
    per_pair = {}
    for pair in HELDOUT_PAIRS:
        row = {}
        for col, key in ((False, "plain"), (True, "coloured")):
            hits = [ok for p, c, ok in outcomes if p == pair and c == col]
            row[key] = rate(sum(hits), len(hits))
        per_pair[" ".join(pair)] = row
    total = {}
    for col, key in ((False, "plain"), (True, "coloured")):
        hits = [ok for _, c, ok in outcomes if c == col]
        total[key] = rate(sum(hits), len(hits))
    info_path = Path(model_dir) / "toyworld_pretrain.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return {
        "model": model_dir,
        "model_step": info.get("step"),
        "model_init_from": info.get("init_from"),
        "sampler": f"DDIM {steps} steps, CFG {guidance}, seeds {seed0}..{seed0 + seeds - 1} per prompt",
        "judge": "checker: exactly one object of the right shape (plain) and colour (coloured)",
        "total": total,
        "per_pair": per_pair,
        "failures": failures,
        "seconds": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Measure the toy model's ceiling on the held-out pairs.")
    ap.add_argument("--model", default="models/toyworld")
    ap.add_argument("--out", default="benchmarks/results/toyworld_ceiling.json")
    ap.add_argument("--seeds", type=int, default=32, help="seeds per prompt (>= 16)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--checker", default=None)
    ap.add_argument("--seed0", type=int, default=SEED0, help="first sampling seed (another range confirms a pick)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = run_ceiling(a.model, a.seeds, a.steps, a.guidance, checker_dir=a.checker, seed0=a.seed0)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    for pair, row in res["per_pair"].items():
        print(f"{pair:16s} plain {row['plain']['rate']:.3f} {row['plain']['ci95']}  "
              f"coloured {row['coloured']['rate']:.3f} {row['coloured']['ci95']}")
    t = res["total"]
    print(f"{'total':16s} plain {t['plain']['rate']:.3f} {t['plain']['ci95']}  "
          f"coloured {t['coloured']['rate']:.3f} {t['coloured']['ci95']}  ({res['seconds']} s)")


if __name__ == "__main__":
    main()
