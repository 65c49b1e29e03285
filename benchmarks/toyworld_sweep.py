"""Choose MCPL's open defaults in the toy world, on validation scenes the benchmark never uses.

Each stage compares training configurations on the same validation scenes (seed base 5000;
toyworld_mcpl.py scores seed base 1000, whose seeds stay below 3500), scored exactly as the
benchmark scores them (recovery of shape and colour, IoU, paired 95 % intervals over scenes),
with the untrained and the true word as rows.

    python benchmarks/toyworld_sweep.py bare --mode bare --scenes 12     # why AttnMask/PromptCL cost recovery
    python benchmarks/toyworld_sweep.py views --mode shuffled            # PromptCL views: same prompt vs other order
    python benchmarks/toyworld_sweep.py cl --mode bare                   # tau x lambda with the new views
    python benchmarks/toyworld_sweep.py lr --mode shuffled               # learning rate x steps
    python benchmarks/toyworld_sweep.py shuffle --mode bare shuffled      # phrase_shuffle for each variant
    python benchmarks/toyworld_sweep.py parts --mode shuffled three --scenes 8   # which regulariser costs recovery

Writes benchmarks/results/toyworld_sweep_<stage>_<mode>.{json,md}; --set KEY=VALUE applies to every config.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from toyworld_mcpl import (  # noqa: E402
    FULL,
    MODES,
    RESULTS,
    allowed,
    build_report,
    parse_args,
    plan_units,
    report_text,
    run,
    settings_of,
)

VALIDATION_SEED = 5000
CL = {"attn_mask": True, "prompt_cl": True}
STAGES: dict[str, dict[str, dict]] = {
    # the bare-sentence collapse: which part of the regularisers costs recovery
    "bare": {
        "mcpl_one": {},
        "attn_mask": {"attn_mask": True},
        "cl_only_reordered": {"prompt_cl": True, "cl_reorder": True},
        "attn_cl_reordered": {**CL, "cl_reorder": True},
        "cl_only": {"prompt_cl": True},
        "attn_cl": CL,
    },
    # PromptCL views: the written sentence (default) vs its phrases in another order (cl_reorder)
    "views": {
        "mcpl_one": {},
        "attn_mask": {"attn_mask": True},
        "full_reordered": {**FULL, "cl_reorder": True},
        "full": FULL,
    },
    # lambda with reordered views (full_w*: cl_reorder on) beside the written-order views (full_same_views);
    # results: toyworld_sweep_lambda_{bare,shuffled}.md, measured before cl_reorder became a switch (off)
    "lambda": {
        "mcpl_one": {},
        "attn_mask": {"attn_mask": True},
        "full_same_views": FULL,
        **{f"full_w{w:g}": {**FULL, "cl_reorder": True, "cl_weight": w} for w in (1e-3, 5e-3, 5e-2)},
    },
    "cl": {
        "mcpl_one": {},
        **{f"full_tau{t:g}_w{w:g}": {**FULL, "cl_temperature": t, "cl_weight": w}
           for t, w in ((0.07, 0.05), (0.07, 0.2), (0.2, 0.05), (0.2, 0.2), (0.07, 0.01))},
    },
    "mask": {
        "mcpl_one": {},
        **{f"full_k{k:g}": {**FULL, "mask_threshold": k} for k in (0.3, 0.5)},
        "full_running": {**FULL, "mask_source": "running"},
        "full_warmup20": {**FULL, "mask_warmup_steps": 20},
    },
    "lr": {
        **{f"{name}_lr{lr:g}": {**fields, "learning_rate": lr}
           for lr in (1.5e-3, 3e-3, 6e-3) for name, fields in (("mcpl_one", {}), ("full", FULL))},
    },
    # the UNet's prompt in another phrase order (phrase_shuffle): second-place words learned where they are first
    "shuffle": {
        **{f"{name}{tag}": {**fields, **extra} for name, fields in (("mcpl_all", {"strategy": "all"}),
                                                                    ("mcpl_one", {}), ("full", FULL))
           for tag, extra in (("", {}), ("_shuffle", {"phrase_shuffle": 0.5}))},
    },
    # which part of full MCPL costs recovery against MCPL-one (benchmark v2 on the shipped model: -5 to -9 points)
    "parts": {
        "mcpl_one": {},
        "attn_mask": {"attn_mask": True},
        "prompt_cl_bind": {"prompt_cl": True, "bind_adj": True},
        "full": FULL,
        "full_k0.3": {**FULL, "mask_threshold": 0.3},
    },
    "steps": {
        **{f"{name}_s{steps}": {**fields, "steps": steps}
           for steps in (60, 150) for name, fields in (("mcpl_all", {"strategy": "all"}), ("mcpl_one", {}),
                                                       ("full", FULL))},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--mode", nargs="*", choices=MODES, default=["bare"])
    parser.add_argument("--configs", nargs="*", default=None, help="only these configs of the stage")
    known, rest = parser.parse_known_args()
    args = parse_args(["--seed", str(VALIDATION_SEED), "--scenes", "12", *rest])
    args.modes = known.mode
    configs = {m: {k: v for k, v in STAGES[known.stage].items()
                   if allowed(m, v) and (not known.configs or k in known.configs)} for m in known.mode}
    settings = settings_of(args)
    out = Path(args.out) if "--out" in rest else RESULTS / f"toyworld_sweep_{known.stage}_{'_'.join(known.mode)}.json"
    started = time.time()
    units = plan_units(args.modes, args.scenes, args.per_unit, configs)
    references, finished = run(args, units, settings, out)
    report = build_report(settings, references, finished, args.model, round(time.time() - started, 1), False)
    report.update(stage=known.stage, validation_seed=VALIDATION_SEED, configs=configs)
    out.write_text(json.dumps(report, indent=1))
    text = f"Sweep stage `{known.stage}` on validation scenes (seed base {VALIDATION_SEED}).\n\n" + report_text(report)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
