"""`mcpl evaluate`: metrics and plots over a batch's job bundles (for `dvc metrics` / `dvc plots`).

Reads OUT/summary.json of `mcpl batch` and each listed job's job.json (attention IoU with
the ground-truth masks, best IoU with another concept's mask, attention share on the
mask: mcpl/evaluate.py), and writes into --out:

    metrics.json    means over every concept with a mask, job and row counts, training time
    concepts.csv    one row per (job, image, concept): iou, iou_other, share
    loss.csv        mean training loss per step over the batch's jobs
    overlays/       each training image with its concepts' attention maps (PNG)
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
from pathlib import Path

EXAMPLES = """examples:
  mcpl evaluate --batch outputs/batch --out outputs/eval
  dvc metrics show; dvc plots show      (inside the DVC pipeline)"""

METRIC_KEYS = ("iou", "iou_other", "share")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="metrics JSON + plot data over a batch's job bundles",
                              description=__doc__, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", required=True, help="batch folder of `mcpl batch` (summary.json + jobs/)")
    p.add_argument("--out", required=True, help="folder for metrics.json, concepts.csv, loss.csv, overlays/")
    p.set_defaults(handler=run)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def evaluate_batch(batch_dir: str | Path, out_dir: str | Path) -> dict:
    """Write metrics.json, concepts.csv, loss.csv and overlays/ for the jobs of one batch summary."""
    batch_dir, out = Path(batch_dir), Path(out_dir)
    summary_path = batch_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found; run `mcpl batch --out {batch_dir}` first")
    summary = json.loads(summary_path.read_text())
    shutil.rmtree(out / "overlays", ignore_errors=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    concept_rows: list[dict] = []
    losses: dict[int, list[float]] = {}
    seconds, final_losses = 0.0, []
    for job in summary["jobs"]:
        if job["status"] not in ("done", "skipped"):
            continue
        job_path = batch_dir / job["out_dir"]
        record = json.loads((job_path / "job.json").read_text())
        label = re.sub(r"[^A-Za-z0-9_.-]", "_", f"g-{job['group']}") if job.get("group") \
            else f"row{job['rows'][0]:03d}"
        seconds += float(record.get("train_seconds") or 0.0)
        if record.get("final_loss") is not None:
            final_losses.append(float(record["final_loss"]))
        for entry in record.get("history", []):
            losses.setdefault(int(entry["step"]), []).append(float(entry["loss"]))
        for i, image in enumerate(record.get("images", [])):
            src = job_path / image["overlay"]
            if src.is_file():
                shutil.copyfile(src, out / "overlays" / f"{label}_image{i}.png")
            for token, values in record.get("metrics", {}).get(f"image_{i}", {}).items():
                concept_rows.append({"concept": f"{label}/{i}/{token}", "job_id": job["job_id"],
                                     "rows": " ".join(map(str, job["rows"])), "image": image.get("source", ""),
                                     "token": token, **{k: round(float(values[k]), 4) for k in METRIC_KEYS}})
    _write_csv(out / "concepts.csv", concept_rows, ["concept", *METRIC_KEYS, "job_id", "rows", "image", "token"])
    _write_csv(out / "loss.csv", [{"step": s, "loss": round(sum(v) / len(v), 5)} for s, v in sorted(losses.items())],
               ["step", "loss"])
    counts = summary.get("counts", {})
    ious = [r["iou"] for r in concept_rows]
    metrics = {
        "jobs": {"total": len(summary["jobs"]), "trained": counts.get("done", 0),
                 "skipped": counts.get("skipped", 0), "failed": counts.get("failed", 0)},
        "rows_rejected": len(summary.get("rejected", [])),
        "attention": {
            "concepts": len(concept_rows),
            **{k: _mean([r[k] for r in concept_rows]) for k in METRIC_KEYS},
            # a concept is separated when its map overlaps its own mask more than any other's
            "separated": _mean([1.0 if r["iou"] > r["iou_other"] else 0.0 for r in concept_rows]),
            "iou_min": round(min(ious), 4) if ious else None,
        },
        "train": {"seconds": round(seconds, 1), "final_loss": _mean(final_losses)},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def run(args: argparse.Namespace) -> int:
    try:
        metrics = evaluate_batch(args.batch, args.out)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=1))
    print(f"-> {args.out}/metrics.json, concepts.csv, loss.csv, overlays/")
    return 0
