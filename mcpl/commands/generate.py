"""`mcpl generate`: images from a prompt that uses learned concepts, with attention overlays."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mcpl.commands.common import add_model_option, configure_threads, resolve_model

EXAMPLES = """examples:
  mcpl generate "a photo of <dog>" --concepts runs/dog
  mcpl generate "a <cat> next to a <dog>" --concepts runs/cat --concepts runs/dog --num 4
  mcpl generate "a photo of <dog>" --concepts runs/dog/concepts/dog/learned_embeds.safetensors

--concepts takes a job folder (all its concepts) or a single learned_embeds.safetensors file."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate images with learned concepts",
                              description=__doc__, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="prompt using the concepts' tokens, e.g. 'a photo of <dog>'")
    p.add_argument("--concepts", action="append", default=[], help="job folder or concept file (repeatable)")
    p.add_argument("--num", type=int, default=4, help="images to generate")
    p.add_argument("--steps", type=int, default=25, help="DDIM sampling steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--out", default="runs/generate", help="output folder")
    add_model_option(p)
    p.set_defaults(handler=run)


def concept_files(paths: list[str]) -> tuple[list[Path], str | None]:
    """Expand job folders to their concept files; also return the base model they used."""
    from mcpl.errors import FileCheckError
    from mcpl.job.bundle import Bundle

    files, model = [], None
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            bundle = Bundle(path)
            record = bundle.record()
            files += list(bundle.concept_files(record).values())
            model = model or record.base_model
        elif path.is_file():
            files.append(path)
        else:
            raise FileCheckError(f"no job folder or concept file at {raw}")
    return files, model


def run(args: argparse.Namespace) -> int:
    from mcpl.concepts.generate import generate, load_concepts, load_pipeline

    configure_threads(args.threads)
    files, job_model = concept_files(args.concepts)
    model = args.model or job_model or resolve_model(None)
    pipe = load_pipeline(model, args.device)
    tokens = load_concepts(pipe, files)
    missing = [t for t in tokens if t not in args.prompt]
    if missing:
        print(f"note: loaded but not used in the prompt: {', '.join(missing)}", file=sys.stderr)
    used = [t for t in tokens if t in args.prompt]
    result = generate(pipe, args.prompt, used, num_images=args.num, steps=args.steps,
                      guidance=args.guidance, seed=args.seed, size=args.size)
    out = result.save(args.out)
    print(f"{len(result.images)} image(s) of {args.prompt!r} -> {out} (image_N.png, attention_N.png)")
    return 0
