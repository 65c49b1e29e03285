"""`mcpl train`: learn one word per marked concept of an image (or a diverse group)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mcpl.commands.common import add_model_option, configure_threads, resolve_model
from mcpl.errors import EXIT_USAGE

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
    p.add_argument("--fidelity-model", default=None, metavar="DIR",
                   help="local DINOv2 / DINO (ViT) / CLIP folder: score each concept's samples against its "
                        "object (fidelity_<type> in job.json; docs/FIDELITY.md)")
    p.add_argument("--clip-model", default=None, metavar="DIR", help="local CLIP folder: also clip_t")
    p.add_argument("--out", default="runs/train", help="output folder (bundle + checkpoints)")
    add_model_option(p)
    p.set_defaults(handler=run)


def _open(path: str, kind: str = "RGB"):
    from mcpl.errors import FileCheckError
    from mcpl.pipeline.data.files import open_image

    if not Path(path).is_file():
        raise FileCheckError(f"{path}: file not found")
    try:
        return open_image(Path(path), kind=kind)[0]
    except FileCheckError as err:
        raise FileCheckError(f"{path}: {err}") from None


def run(args: argparse.Namespace) -> int:
    from mcpl.config import ConfigSource, RunOptions
    from mcpl.job.run import run_job
    from mcpl.method.inputs import JobInput

    if len(args.image) != len(args.sentence):
        print(f"error: {len(args.image)} --image but {len(args.sentence)} --sentence; give one sentence per image",
              file=sys.stderr)
        return EXIT_USAGE
    configure_threads(args.threads)
    flags = {"strategy": args.strategy, "steps": args.steps, "attn_mask": args.attn_mask or None,
             "prompt_cl": args.prompt_cl or None, "bind_adj": args.bind_adj or None}
    source = ConfigSource.from_options(None, flags, args.set, full=args.full)
    config = source.for_job(images=len(args.image))
    if args.strategy == "all" and len(args.image) > 1:
        print("error: MCPL-all takes exactly one image; use --strategy diverse for several", file=sys.stderr)
        return EXIT_USAGE
    masks = {}
    for spec in args.mask:
        token, _, path = spec.partition("=")
        masks[token.strip()] = _open(path, "L")
    inputs = [JobInput.from_text(_open(img), sentence, source=img, masks=masks if i == 0 else None)
              for i, (img, sentence) in enumerate(zip(args.image, args.sentence, strict=True))]
    options = RunOptions(device=args.device, threads=args.threads, samples=args.samples,
                         fidelity_model=args.fidelity_model, clip_model=args.clip_model)
    result = run_job(resolve_model(args.model), inputs, config, args.out, options=options)
    out = Path(args.out)
    record = result.record
    print(f"\nlearned {len(record.concepts)} concept(s) in {record.train_seconds:.1f} s -> {out}")
    for concept in record.concepts:
        print(f"  {concept.token:<16} {out / concept.file}")
    for image in record.images:
        print(f"  attention overlay: {out / image.overlay}")
    if record.samples:
        print(f"  samples:           {result.bundle.samples_dir / 'all.png'}")
    if record.metrics:
        print("  metrics: " + json.dumps(record.metrics))
    return 0
