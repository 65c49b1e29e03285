"""`mcpl batch`: train every job of a validated manifest, in this process; skip done jobs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mcpl.commands.common import add_model_option, resolve_model

EXAMPLES = """examples:
  mcpl data validate data/example --manifest outputs/manifest.parquet
  mcpl batch --manifest outputs/manifest.parquet --out outputs/batch
  mcpl batch --manifest ... --out ... --config params.yaml:train --set steps=50 --samples 0

Each job's bundle goes to OUT/jobs/<job_id>/ (see mcpl/job.py); OUT/summary.json lists
every job's outcome and every row rejected at validation. A rerun skips finished jobs and
resumes interrupted ones. Exit code 1 if any job failed (the others still ran)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("batch", help="train all jobs of a manifest (in-process), skipping done ones",
                              description=__doc__, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="manifest.parquet written by `mcpl data validate`")
    p.add_argument("--out", required=True, help="batch folder (jobs/<job_id>/ bundles + summary.json)")
    p.add_argument("--config", default=None, metavar="FILE[:SECTION]",
                   help="YAML/JSON mapping of TrainConfig fields, optionally one section of it "
                        "(e.g. params.yaml:train)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any TrainConfig field, over --config (repeatable)")
    p.add_argument("--samples", type=int, default=2, help="generations per concept after training (0: none)")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of those generations")
    p.add_argument("--no-skip", action="store_true", help="re-run jobs even if their bundle is done")
    p.add_argument("--drop-checkpoints", action="store_true",
                   help="delete each finished job's checkpoints/ (resumable state) to save space")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or library notices (one line per job stays)")
    add_model_option(p)
    p.set_defaults(handler=run)


def load_config_file(spec: str) -> dict:
    """`FILE` or `FILE:SECTION` (dotted) -> mapping of TrainConfig fields."""
    import yaml

    path, _, section = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    data = yaml.safe_load(Path(path).read_text()) or {}
    for key in filter(None, section.split(".")):
        if not isinstance(data, dict) or key not in data:
            raise ValueError(f"{path} has no section {section!r}")
        data = data[key]
    if not isinstance(data, dict):
        raise ValueError(f"{spec} is not a mapping of TrainConfig fields")
    return data


def _quiet_libraries() -> None:
    """No weight-loading bars or import notices from transformers/diffusers (pipeline logs)."""
    import transformers
    from diffusers.utils import logging as diffusers_logging

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


def run(args: argparse.Namespace) -> int:
    if args.quiet:
        _quiet_libraries()
    from mcpl.config import TrainConfig, parse_overrides
    from mcpl.pipeline.data import DatasetError, load_jobs, rejected_rows
    from mcpl.pipeline.runner import run_batch

    try:
        fields = load_config_file(args.config) if args.config else {}
        fields.update(parse_overrides(args.set))
        config = TrainConfig(**fields)
        model = resolve_model(args)
        jobs = load_jobs(args.manifest, config, model)
        rejected = rejected_rows(args.manifest)
    except (DatasetError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(jobs)} job(s) from {args.manifest} on {model}; {len(rejected)} row(s) were rejected at "
          "validation", file=sys.stderr)
    summary = run_batch(jobs, args.out, skip_done=not args.no_skip, progress=not args.quiet, rejected=rejected,
                        samples=args.samples, sample_steps=args.sample_steps, device=args.device,
                        keep_checkpoints=not args.drop_checkpoints)
    print(summary.render())
    print(f"summary: {Path(args.out) / 'summary.json'}")
    if summary.failed:
        print(json.dumps([{"job_id": j.job_id, "rows": j.rows, "error": j.error} for j in summary.failed]),
              file=sys.stderr)
    return 0 if summary.ok else 1
