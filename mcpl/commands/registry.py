"""`mcpl registry`: the learned concepts as versioned MLflow registered models.

Names are `<dataset>.<image-or-group>.<concept>` (see mcpl/registry.py); each training
is a version; `NAME` alone, `NAME@latest`, `NAME@one` (alias per strategy), `NAME/3` and
`models:/NAME@latest` all name a version.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from mcpl.errors import EXIT_UNAVAILABLE, MCPLError

EXAMPLES = """examples:
  mcpl registry build runs/batch                    replay spooled MLflow logs, publish the batch's bundles
  mcpl registry list
  mcpl registry list --filter "tags.concept = 'dog'"
  mcpl registry show example.images-00000.obj1
  mcpl registry export example.images-00000.obj1 --format a1111 --out exports/
  mcpl registry load example.images-00000.obj1 example.red-circle.circle \\
       --prompt "a photo of <obj1> next to a <circle>"

MLflow: --tracking-uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db (SQLite, no server)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("registry", help="list, show, export and load learned concepts (MLflow registry)",
                              description=__doc__, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI")
    sub = p.add_subparsers(dest="registry_command", required=True, metavar="ACTION")

    b = sub.add_parser("build", help="replay spooled logs and publish the concepts of job bundles")
    b.add_argument("root", help="a batch output folder (the jobs its summary.json lists), a job bundle, "
                   "or any folder of bundles")
    b.add_argument("--experiment", default="mcpl")
    b.add_argument("--no-snapshot", action="store_true", help="skip the Parquet registry snapshot")
    b.set_defaults(handler=run_build)

    lst = sub.add_parser("list", help="one line per concept")
    lst.add_argument("--filter", default="", help="MLflow registered-model filter, e.g. \"name LIKE 'example.%%'\"")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(handler=run_list)

    s = sub.add_parser("show", help="a concept's versions, tags, aliases and runs")
    s.add_argument("ref")
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=run_show)

    e = sub.add_parser("export", help="write a concept for diffusers, Automatic1111 or ComfyUI (safetensors)")
    e.add_argument("ref")
    e.add_argument("--format", choices=("diffusers", "a1111", "comfyui", "kohya"), default="diffusers",
                   help="diffusers: one file per text encoder; a1111/comfyui/kohya: one file (SDXL: clip_l + clip_g)")
    e.add_argument("--out", default="exports", help="output folder")
    e.add_argument("--name", default=None, help="file stem (A1111/ComfyUI trigger word): letters, digits, "
                   "'.', '_' and '-', written inside --out; default: the registry name")
    e.add_argument("--force", action="store_true", help="replace files of the same name in --out "
                   "(default: refuse to overwrite)")
    e.set_defaults(handler=run_export)

    ld = sub.add_parser("load", help="load concepts by name into a pipeline and generate")
    ld.add_argument("refs", nargs="+", help="concepts; NAME=<token> picks the prompt token")
    ld.add_argument("--prompt", required=True)
    ld.add_argument("--model", default=None, help="base model (default: the one the first concept was trained on)")
    ld.add_argument("--device", default=None)
    ld.add_argument("--num", type=int, default=2)
    ld.add_argument("--steps", type=int, default=25)
    ld.add_argument("--seed", type=int, default=0)
    ld.add_argument("--out", default="runs/registry-load")
    ld.set_defaults(handler=run_load)


def _tracking(handler):
    """A registry command: an MLflow server that stops answering mid-way is TrackingUnavailable (exit 3),
    never a traceback, an empty list or "no such concept"."""
    @functools.wraps(handler)
    def wrapped(args: argparse.Namespace) -> int:
        from mcpl.pipeline.tracking.store import is_unreachable, unreachable_error

        try:
            return handler(args)
        except MCPLError:
            raise
        except Exception as err:
            if is_unreachable(err):
                raise unreachable_error(err, args.tracking_uri) from None
            raise
    return wrapped


def _shown(value: object) -> str:
    """Registry text (tags, descriptions: user data, possibly from before validation refused control
    characters) made safe for the terminal."""
    from mcpl.method.prompts import visible

    return visible("" if value is None else value)


@_tracking
def run_build(args: argparse.Namespace) -> int:
    from mcpl.errors import TrackingUnavailable
    from mcpl.pipeline.tracking.store import probe, resolve_tracking_uri, unavailable_message

    uri = resolve_tracking_uri(args.tracking_uri)
    problem = probe(uri)  # seconds, before torch/transformers load and before any card is written
    if problem:
        spool = Path(args.root) / "mlflow-spool"
        kept = f"; the spooled logs in {spool} stay there" if spool.is_dir() else ""
        raise TrackingUnavailable(unavailable_message(uri, problem) + kept + "; nothing published")
    from mcpl.commands.common import quiet_libraries
    from mcpl.pipeline.registry.publish import publish_bundles
    from mcpl.pipeline.tracking.tracker import Tracker

    quiet_libraries()  # one line per published version, no download bar per snapshot row
    root = Path(args.root)
    spool = root / "mlflow-spool"
    if spool.is_dir():
        status = Tracker(args.tracking_uri, spool, args.experiment).finish()
        print(status.message())
        if status.pending:
            print("error: MLflow still unreachable; nothing published", file=sys.stderr)
            return EXIT_UNAVAILABLE
    report = publish_bundles(root, args.tracking_uri, args.experiment, snapshot=not args.no_snapshot)
    print(report.message())
    for name, version in report.created:
        print(f"  new  {name} v{version}")
    return 0


@_tracking
def run_list(args: argparse.Namespace) -> int:
    from mcpl.pipeline.registry.refs import list_concepts

    rows = list_concepts(args.tracking_uri, args.filter)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no concepts registered (run a batch, or `mcpl registry build OUT`)")
        return 0
    rows = [{k: _shown(v) for k, v in r.items()} for r in rows]
    width = max(len(r["name"]) for r in rows)
    print(f"{'name':<{width}}  ver  {'token':<12} {'strategy':<8} source")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['latest']:>3}  {r['token']:<12} {r['strategy']:<8} {r['source_image']}")
    return 0


@_tracking
def run_show(args: argparse.Namespace) -> int:
    from mcpl.pipeline.registry.refs import show

    info = show(args.ref, args.tracking_uri)
    if args.json:
        print(json.dumps(info, indent=1, default=str))  # JSON escapes control characters itself
        return 0
    v_ = _shown
    print(f"{v_(info['name'])}: {v_(info['description'])}")
    print("  aliases: " + (", ".join(f"@{v_(a)} -> v{v_(v)}" for a, v in info["aliases"].items()) or "-"))
    for v in info["versions"]:
        tags = v["tags"]
        metrics = ", ".join(f"{v_(k[7:])}={v_(val)}" for k, val in tags.items() if k.startswith("metric."))
        print(f"  v{v_(v['version'])}: token {v_(tags.get('token'))} strategy {v_(tags.get('strategy'))} "
              f"steps {v_(tags.get('steps'))} run {v_(v['run_id'])}\n       sentence: {v_(tags.get('sentence'))}"
              f"\n       metrics: {metrics or '-'}")
    return 0


@_tracking
def run_export(args: argparse.Namespace) -> int:
    from mcpl.pipeline.registry.refs import export

    path = export(args.ref, args.out, args.format, args.name, args.tracking_uri, force=args.force)
    print(f"{_shown(args.ref)} -> {_shown(path)} ({args.format})")
    return 0


@_tracking
def run_load(args: argparse.Namespace) -> int:
    from mcpl.pipeline.tracking.store import client_for

    refs, tokens = [], []
    for item in args.refs:
        ref, _, token = item.partition("=")
        refs.append(ref)
        tokens.append(token or None)
    client = client_for(args.tracking_uri, read_only=True)  # before torch/diffusers load: fail fast
    from mcpl.concepts.generate import generate, load_pipeline, prompt_warnings
    from mcpl.pipeline.registry.refs import load_into_pipeline, resolve

    model = args.model
    if model is None:
        name, version = resolve(client, refs[0])
        model = client.get_model_version(name, version).tags.get("base_model")
    pipe = load_pipeline(model, args.device)
    loaded = load_into_pipeline(pipe, refs, tokens, client=client)
    for item in loaded:
        print(f"  {_shown(item.token):<28} <- {_shown(item.name)} v{_shown(item.version)}")
    for warning in prompt_warnings(pipe, args.prompt, [i.token for i in loaded]):
        print(f"warning: {_shown(warning)}", file=sys.stderr)
    used = [i.token for i in loaded if i.token in args.prompt]
    result = generate(pipe, args.prompt, used, num_images=args.num, steps=args.steps, seed=args.seed)
    out = result.save(args.out)
    print(f"{len(result.images)} image(s) of {args.prompt!r} -> {out}")
    return 0
