"""`mcpl evaluate`: metrics and plots over a batch's job bundles (for `dvc metrics` / `dvc plots`).

Reads OUT/summary.json of `mcpl batch` and each listed job's job.json (attention IoU with
the ground-truth masks, best IoU with another concept's mask, attention share on the
mask: mcpl/concepts/metrics.py; written by mcpl/pipeline/report.py), and writes into --out:

    metrics.json    means over every concept with a mask, job and row counts, training time
    concepts.csv    one row per (job, image, concept): iou, iou_other, share
    loss.csv        mean training loss per step over the batch's jobs
    overlays/       each training image with its concepts' attention maps (PNG)
"""

from __future__ import annotations

import argparse
import json

EXAMPLES = """examples:
  mcpl evaluate --batch outputs/batch --out outputs/eval
  dvc metrics show; dvc plots show      (inside the DVC pipeline)"""

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="metrics JSON + plot data over a batch's job bundles",
                              description=__doc__, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", required=True, help="batch folder of `mcpl batch` (summary.json + jobs/)")
    p.add_argument("--out", required=True, help="folder for metrics.json, concepts.csv, loss.csv, overlays/")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mcpl.errors import BundleError
    from mcpl.pipeline.report import evaluate_batch

    try:
        metrics = evaluate_batch(args.batch, args.out)
    except FileNotFoundError as err:
        raise BundleError(str(err)) from None
    print(json.dumps(metrics, indent=1))
    print(f"-> {args.out}/metrics.json, concepts.csv, loss.csv, overlays/")
    return 0
