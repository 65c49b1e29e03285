"""`mcpl data`: check a dataset folder and write its manifest; render the example dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  mcpl data example data/example                 render the example dataset (toy scenes + masks)
  mcpl data validate data/example                -> data/example/manifest.parquet
  mcpl data validate data/mine --manifest outputs/manifest.parquet --model models/toyworld

A dataset is a folder with images (+ masks) and rows.jsonl or rows.csv; see docs/DATA.md.
exit codes of validate: 0 every row valid, 1 some rows rejected (listed), 2 the dataset cannot be read."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="validate a dataset (manifest) or render the example dataset",
                              description=__doc__, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    v = sub.add_parser("validate", help="check every row; write manifest.parquet; list rejected rows",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("dataset", help="dataset folder (images, masks and rows.jsonl or rows.csv)")
    v.add_argument("--manifest", default=None, help="where to write the manifest (default DATASET/manifest.parquet)")
    v.add_argument("--table", default=None, help="table file name inside DATASET (default rows.jsonl or rows.csv)")
    v.add_argument("--model", default=None, help="base model whose tokenizer checks the sentences "
                                                  "(default: the embedded toy-world model)")
    v.add_argument("--max-pixels", type=_positive, default=None,
                   help="largest image accepted, width x height (default 40,000,000)")
    v.add_argument("--keep-going", action="store_true",
                   help="exit 0 even if rows were rejected (they stay listed in the manifest); for pipelines")
    v.add_argument("--quiet", action="store_true", help="print only the rejected rows")
    v.set_defaults(handler=run_validate)

    e = sub.add_parser("example", help="render the example dataset (toy scenes with masks, one diverse group)")
    e.add_argument("out", nargs="?", default="data/example", help="output folder (default data/example)")
    e.add_argument("--scenes", type=int, default=4, help="two-object scenes, one job each (default 4)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--style", choices=("shape", "generic"), default="shape",
                   help="'shape': a red <obj1|circle|red>; 'generic': a <obj1|object>")
    e.add_argument("--group", type=_boolean, default=True, metavar="{true,false}",
                   help="add the two-image MCPL-diverse group (default true)")
    e.set_defaults(handler=run_example)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels, got {value}")
    return value


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def run_validate(args: argparse.Namespace) -> int:
    from mcpl.pipeline.data import DEFAULT_MAX_PIXELS, DatasetError, validate_dataset

    try:
        report = validate_dataset(args.dataset, args.manifest, args.model,
                                  args.max_pixels or DEFAULT_MAX_PIXELS, table=args.table)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = report.render()
    if args.quiet:
        text = "\n".join(line for line in text.splitlines() if not line.startswith("  row ")) \
            if report.rejected else ""
    if text:
        print(text)
    if report.rejected:
        print(f"\n{len(report.rejected)} row(s) rejected; fix them (docs/DATA.md lists every error) and "
              "validate again. The other rows are in the manifest and will train.", file=sys.stderr)
        return 0 if args.keep_going else 1
    return 0


def run_example(args: argparse.Namespace) -> int:
    from mcpl.pipeline.data.example import write_example

    rows = write_example(args.out, scenes=args.scenes, seed=args.seed, style=args.style, group=args.group)
    print(f"wrote {len(rows)} rows ({len(list(Path(args.out, 'images').glob('*.png')))} images + masks) "
          f"to {args.out}/rows.jsonl")
    return 0
