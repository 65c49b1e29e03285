"""`mcpl evaluate`: metrics and plots over a batch's job bundles (for `dvc metrics` / `dvc plots`).

Reads OUT/summary.json of `mcpl batch` and each listed job's job.json (attention IoU with
the ground-truth masks, best IoU with another concept's mask, attention share on the
mask: mcpl/concepts/metrics.py; written by mcpl/pipeline/report.py), and writes into --out:

    metrics.json    means over every concept with a mask, job and row counts, training time;
                    `fidelity`: mean masked similarity of each concept's generations to its object
                    (fidelity_<type>, clip_t; mcpl/concepts/fidelity.py, docs/FIDELITY.md) when the
                    jobs computed it (--fidelity-model of batch/train) or --fidelity-model is given
    concepts.csv    one row per (job, image, concept): iou, iou_other, share (+ fidelity_<type>, clip_t)
    loss.csv        mean training loss per step over the batch's jobs
    overlays/       each training image with its concepts' attention maps (PNG)
"""

from __future__ import annotations

import argparse
import json
import sys

EXAMPLES = """examples:
  mcpl evaluate --batch outputs/batch --out outputs/eval
  mcpl evaluate --batch outputs/batch --out outputs/eval --fidelity-model models/dinov2-small
  dvc metrics show; dvc plots show      (inside the DVC pipeline)"""

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="metrics JSON + plot data over a batch's job bundles",
                              description=__doc__, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", required=True, help="batch folder of `mcpl batch` (summary.json + jobs/)")
    p.add_argument("--out", required=True, help="folder for metrics.json, concepts.csv, loss.csv, overlays/")
    p.add_argument("--fidelity-model", default=None, metavar="DIR",
                   help="local DINOv2 / DINO (ViT) / CLIP transformers folder: compute each concept's masked "
                        "similarity (fidelity_<type>) from the bundles and the training images (docs/FIDELITY.md)")
    p.add_argument("--clip-model", default=None, metavar="DIR",
                   help="local CLIP folder with its tokenizer: also clip_t (text-image similarity)")
    p.add_argument("--device", default=None, help="device of the feature models (default: cuda if available)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mcpl.errors import BundleError
    from mcpl.pipeline.report import evaluate_batch

    try:
        metrics = evaluate_batch(args.batch, args.out, (args.fidelity_model, args.clip_model), args.device)
    except FileNotFoundError as err:
        raise BundleError(str(err)) from None
    for note in metrics.pop("fidelity_notes", []):
        print(f"warning: {note}", file=sys.stderr)
    print(json.dumps(metrics, indent=1))
    print(f"-> {args.out}/metrics.json, concepts.csv, loss.csv, overlays/")
    return 0
