"""`mcpl batch`: train every job of a validated manifest in this process; skip done jobs."""

from __future__ import annotations

import argparse
import json
import sys

from mcpl.commands.common import add_model_option, configure_threads, quiet_libraries, resolve_model
from mcpl.errors import EXIT_PARTIAL

EXAMPLES = """examples:
  mcpl data validate data/example --manifest outputs/manifest.parquet
  mcpl batch --manifest outputs/manifest.parquet --out outputs/batch
  mcpl batch --manifest ... --out ... --config params.yaml:train --set steps=50 --samples 0

Settings, later wins: defaults -> --config -> the row's own overrides -> --set.
Each job's bundle goes to OUT/jobs/<job_id>/ (mcpl/job/bundle.py); OUT/summary.json lists
every job's outcome and every input row's fate (trained, done before, duplicate, rejected,
failed). A rerun skips finished jobs and resumes interrupted ones.
exit codes: 0 every job done, 1 some job failed (the others still ran), 2 bad input."""


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
                   help="any TrainConfig field; wins over --config and the rows' overrides (repeatable)")
    p.add_argument("--samples", type=int, default=2, help="generations per concept after training (0: none)")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of those generations")
    p.add_argument("--fidelity-model", default=None, metavar="DIR",
                   help="local DINOv2 / DINO (ViT) / CLIP folder: score each concept's samples against its "
                        "object (fidelity_<type> in job.json, MLflow, registry tags; docs/FIDELITY.md)")
    p.add_argument("--clip-model", default=None, metavar="DIR", help="local CLIP folder: also clip_t")
    p.add_argument("--no-skip", action="store_true", help="re-run jobs even if their bundle is done")
    p.add_argument("--drop-checkpoints", action="store_true",
                   help="delete each finished job's checkpoints/ (resumable state) to save space")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="long-lived worker processes (CPU: one thread each; GPUs: one per GPU); default 1 = here")
    p.add_argument("--pack", type=int, default=None, metavar="K",
                   help="jobs trained together in one UNet call per step (default: 4 on CPU, from memory on GPU)")
    p.add_argument("--progress", action="store_true", help="progress bars per job (default: progress lines)")
    p.add_argument("--quiet", action="store_true", help="no library notices (job lines stay)")
    add_model_option(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mcpl.config import ConfigSource, RunOptions
    from mcpl.pipeline.data import plan_jobs
    from mcpl.pipeline.progress import LogObserver
    from mcpl.pipeline.workers import run_batch

    if args.quiet:
        quiet_libraries()
    configure_threads(args.threads)
    source = ConfigSource.from_options(args.config, sets=args.set)
    model = resolve_model(args.model)
    plan = plan_jobs(args.manifest, source, model)
    options = RunOptions(device=args.device, threads=args.threads, samples=args.samples,
                         sample_steps=args.sample_steps, progress=args.progress, skip_done=not args.no_skip,
                         keep_checkpoints=not args.drop_checkpoints, fidelity_model=args.fidelity_model,
                         clip_model=args.clip_model)
    print(f"{len(plan.jobs)} job(s) from {args.manifest} on {model}; {len(plan.rejected)} row(s) were rejected at "
          "validation", file=sys.stderr)
    summary = run_batch(plan.jobs, args.out, options, [LogObserver()], workers=args.workers, pack=args.pack,
                        rejected=plan.rejected, merged=plan.merged, model=model, base_config=source.base(),
                        manifest=str(args.manifest))
    print(summary.render())
    print(f"summary: {summary.write()}")
    if summary.failed:
        print(json.dumps([{"job_id": j.job_id, "rows": j.rows, "error": j.error} for j in summary.failed]),
              file=sys.stderr)
        return EXIT_PARTIAL
    return 0
