"""`mcpl train`: learn one word per marked concept of an image (or a diverse group)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mcpl.commands.common import add_model_option, resolve_model

EXAMPLES = """examples:
  mcpl train --image dog.png --sentence "a photo of a brown <dog|dog|brown> on a <board|skateboard>"
  mcpl train --image dog.png --sentence "..." --full --steps 1000 --out runs/dog
  mcpl train --strategy diverse --image a.png --sentence "a <cat> on a sofa" \\
             --image b.png --sentence "a <cat> in the grass"
  mcpl train ... --set mask_threshold=0.3 --set cl_weight=0.01   (any TrainConfig field)

concept syntax: <name>, <name|initializer> or <name|initializer|adjective>; see docs/FORMAT.md.
A rerun of the same command resumes from the newest checkpoint in --out."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="learn concepts from an image and its sentence",
                              description=__doc__, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", action="append", required=True, help="training image (repeat for diverse)")
    p.add_argument("--sentence", action="append", required=True, help="concept sentence, one per --image")
    p.add_argument("--mask", action="append", default=[], metavar="TOKEN=PATH",
                   help="ground-truth mask of a concept of the first image, for metrics (e.g. '<dog>=dog.png')")
    p.add_argument("--strategy", choices=("one", "all", "diverse"), default=None,
                   help="MCPL-one (default for one image), MCPL-all, MCPL-diverse (default for several)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default 500)")
    p.add_argument("--full", action="store_true", help="AttnMask + PromptCL + Bind adj (the full method)")
    p.add_argument("--attn-mask", action="store_true", help="mask the loss by the learned words' attention")
    p.add_argument("--prompt-cl", action="store_true", help="contrastive loss between concepts")
    p.add_argument("--bind-adj", action="store_true", help="each concept's adjective as a PromptCL positive")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig field")
    p.add_argument("--samples", type=int, default=2, help="generations per concept after training (0: none)")
    p.add_argument("--out", default="runs/train", help="output folder (bundle + checkpoints)")
    add_model_option(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mcpl.config import TrainConfig, parse_overrides
    from mcpl.job.run import run_job
    from mcpl.method.models import ModelLoadError
    from mcpl.method.prompts import SentenceError
    from mcpl.method.trainer import JobInput
    from mcpl.pipeline.data.files import FileCheckError, open_image

    if len(args.image) != len(args.sentence):
        print(f"error: {len(args.image)} --image but {len(args.sentence)} --sentence; give one sentence per image",
              file=sys.stderr)
        return 2
    strategy = args.strategy or ("diverse" if len(args.image) > 1 else "one")
    fields: dict[str, object] = {"strategy": strategy}
    if args.steps:
        fields["steps"] = args.steps
    for flag, name in ((args.full or args.attn_mask, "attn_mask"), (args.full or args.prompt_cl, "prompt_cl"),
                       (args.full or args.bind_adj, "bind_adj")):
        if flag:
            fields[name] = True
    try:
        fields.update(parse_overrides(args.set))
        config = TrainConfig(**fields)
        masks = {}
        for spec in args.mask:
            token, _, path = spec.partition("=")
            masks[token.strip()] = open_image(Path(path), kind="L")[0]
        inputs = [JobInput.from_text(open_image(Path(img))[0], sentence, source=img, masks=masks if i == 0 else None)
                  for i, (img, sentence) in enumerate(zip(args.image, args.sentence, strict=True))]
        result = run_job(resolve_model(args), inputs, config, args.out, device=args.device, samples=args.samples)
    except (SentenceError, ModelLoadError, FileCheckError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"\nlearned {len(result.record['concepts'])} concept(s) in {result.record['train_seconds']:.1f} s "
          f"-> {out}")
    for concept in result.record["concepts"]:
        print(f"  {concept['token']:<16} {out / concept['file']}")
    for image in result.record["images"]:
        print(f"  attention overlay: {out / image['overlay']}")
    if result.record.get("samples"):
        print(f"  samples:           {out / 'samples' / 'all.png'}")
    if result.record["metrics"]:
        print("  metrics: " + json.dumps(result.record["metrics"]))
    return 0
