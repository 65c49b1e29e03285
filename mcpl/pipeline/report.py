"""What a batch did, for people and for tools: summary.json, its text and markdown, and the metrics files.

`BatchSummary` accounts for every job and every input row: trained, skipped as done before,
the same work as another row, rejected at validation, or failed, with the reason.
`evaluate_batch` turns a batch's bundles into the DVC metrics and plots files.

Files that DVC hashes hold results only: what differs between two runs of the same work
(wall-clock times, process ids, host names, the folder's absolute path) goes to a `.run.json`
beside them (`summary.run.json`, `metrics.run.json`), so `dvc repro` in a fresh clone leaves
dvc.lock unchanged. `BatchSummary.read` and `to_dict` put the two together again.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mcpl.job.bundle import SUMMARY_FILE, Bundle, JobOutcome, JobStatus, inside, read_json, write_json

METRIC_KEYS = ("iou", "iou_other", "share")
RUN_SUFFIX = ".run.json"  # summary.json -> summary.run.json: the volatile part
VOLATILE_BATCH = ("out_root", "started", "finished")
VOLATILE_JOB = ("seconds", "pid", "worker")


def run_file(path: str | Path) -> Path:
    """The file beside `path` that holds its volatile part (`summary.json` -> `summary.run.json`)."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".json") + RUN_SUFFIX)


def split_volatile(data: dict) -> tuple[dict, dict]:
    """A summary's dict -> (its results, its volatile part keyed like it)."""
    stable = {k: v for k, v in data.items() if k not in VOLATILE_BATCH}
    volatile = {k: data[k] for k in VOLATILE_BATCH if k in data}
    stable["jobs"], volatile["jobs"] = [], {}
    for job in data.get("jobs", []):
        stable["jobs"].append({k: v for k, v in job.items() if k not in VOLATILE_JOB})
        volatile["jobs"][job.get("job_id")] = {k: job[k] for k in VOLATILE_JOB if k in job}
    return stable, volatile


def join_volatile(stable: dict, volatile: dict) -> dict:
    data = {**stable, **{k: v for k, v in volatile.items() if k != "jobs"}}
    extra = volatile.get("jobs") if isinstance(volatile.get("jobs"), dict) else {}
    data["jobs"] = [{**job, **(extra.get(job.get("job_id")) or {})} if isinstance(job, dict) else job
                    for job in stable.get("jobs", [])]
    return data


def _label(o: JobOutcome) -> str:
    rows = ", ".join(map(str, o.rows))
    return f"group {o.group!r}, rows {rows}" if o.group else f"row {rows}"


def markdown_text(text: object) -> str:
    """Text shown literally in markdown (Prefect artifacts, MLflow descriptions): `<obj1>` stays `<obj1>`."""
    return re.sub(r"([\\`*_{}\[\]<>()#+!|])", r"\\\1", str(text))


@dataclass
class BatchSummary:
    out_root: str
    jobs: list[JobOutcome]
    rejected: list[dict] = field(default_factory=list)  # table rows rejected at validation (from the manifest)
    merged: list[dict] = field(default_factory=list)  # rows that are the same work as another row's job
    started: float = 0.0
    finished: float = 0.0
    tracking: dict = field(default_factory=dict)  # what happened to the MLflow logs (observer)
    registry: dict = field(default_factory=dict)  # what was published (observer)
    batch_key: str = ""
    mlflow_run_id: str | None = None
    links: dict[str, str] = field(default_factory=dict)  # job_id -> URL of its MLflow run

    def count(self, status: JobStatus | str) -> int:
        return sum(1 for j in self.jobs if j.status == JobStatus(status))

    @property
    def failed(self) -> list[JobOutcome]:
        return [j for j in self.jobs if j.status is JobStatus.FAILED]

    @property
    def ok(self) -> bool:
        return not self.failed

    def rows(self) -> list[dict]:
        """Every input row with its fate, sorted by row: the counts add up to the table's rows."""
        out = []
        for j in self.jobs:
            fate = {JobStatus.DONE: "trained", JobStatus.SKIPPED: "done-before", JobStatus.FAILED: "failed"}[j.status]
            out += [{"row": r, "status": fate, "job_id": j.job_id, **({"error": j.error} if j.error else {})}
                    for r in j.rows]
        out += [{"row": m["row"], "status": "duplicate", "job_id": m.get("job_id"), "duplicate_of": m["duplicate_of"]}
                for m in self.merged]
        out += [{"row": r.get("row"), "status": "rejected", "error": r.get("error")} for r in self.rejected]
        return sorted(out, key=lambda r: (r["row"] is None, r["row"] or 0))

    def row_counts(self) -> dict[str, int]:
        counts = {s: 0 for s in ("trained", "done-before", "duplicate", "rejected", "failed")}
        for r in self.rows():
            counts[r["status"]] += 1
        counts["total"] = sum(counts.values())
        return counts

    def to_dict(self) -> dict:
        data = {"out_root": self.out_root, "started": self.started, "finished": self.finished,
                "counts": {s.value: self.count(s) for s in JobStatus} | {
                    "jobs": len(self.jobs), "rejected_rows": len(self.rejected)},
                "row_counts": self.row_counts(), "rows": self.rows(),
                "jobs": [j.to_dict() for j in self.jobs], "rejected": self.rejected, "merged": self.merged}
        if self.tracking:
            data["tracking"] = self.tracking
        if self.registry:
            data["registry"] = self.registry
        if self.batch_key:
            data["batch_key"], data["mlflow_run_id"] = self.batch_key, self.mlflow_run_id
        if self.links:
            data["links"] = self.links
        return data

    def write(self, path: str | Path | None = None) -> Path:
        """summary.json (results: the same for the same work) and summary.run.json (times, processes)."""
        path = Path(path) if path else Path(self.out_root) / SUMMARY_FILE
        stable, volatile = split_volatile(self.to_dict())
        write_json(run_file(path), volatile)
        return write_json(path, stable)

    def render(self) -> str:
        """A few lines a person reads at the end of a batch: counts, then each failure and rejection."""
        rows = self.row_counts()
        lines = [f"{len(self.jobs)} job(s): {self.count('done')} trained, {self.count('skipped')} already done, "
                 f"{self.count('failed')} failed; {len(self.rejected)} table row(s) rejected at validation"
                 + (f"; {len(self.merged)} row(s) the same work as another" if self.merged else "")]
        lines.append(f"rows: {rows['total']} = {rows['trained']} trained + {rows['done-before']} done before + "
                     f"{rows['duplicate']} duplicate + {rows['rejected']} rejected + {rows['failed']} failed")
        for j in self.failed:
            lines.append(f"  FAILED {j.job_id} ({_label(j)}): {j.error}")
        for m in self.merged:
            lines.append(f"  row {m['row']}: the same work as row(s) {', '.join(map(str, m['duplicate_of']))}; "
                         "trained once")
        for r in self.rejected:
            lines.append(f"  rejected row {r.get('row')}: {r.get('error')}")
        for key in ("tracking", "registry"):
            message = getattr(self, key).get("message")
            if message:
                lines.append(message)
        return "\n".join(lines)

    def markdown(self) -> str:
        """The summary as a markdown table (Prefect artifact), each job linked to its MLflow run."""
        rows = ["| job | status | images | concepts / error |", "|---|---|---|---|"]
        for o in self.jobs:
            detail = o.error if o.status is JobStatus.FAILED else ", ".join(o.concepts)
            job = f"[{o.job_id}]({self.links[o.job_id]})" if o.job_id in self.links else o.job_id
            rows.append(f"| {job} | {o.status.value} | {markdown_text(', '.join(o.images))} | "
                        f"{markdown_text(detail)} |")
        notes = [markdown_text(getattr(self, k).get("message", "")) for k in ("tracking", "registry")]
        return "\n".join(rows + [""] + [n for n in notes if n])

    @classmethod
    def read(cls, batch_dir: str | Path) -> BatchSummary:
        path = Path(batch_dir) / SUMMARY_FILE
        data = read_json(path)
        if isinstance(data, dict) and run_file(path).is_file():
            volatile = read_json(run_file(path))
            data = join_volatile(data, volatile) if isinstance(volatile, dict) else data
        return cls(data.get("out_root", str(batch_dir)), [JobOutcome.from_dict(j) for j in data.get("jobs", [])],
                   data.get("rejected", []), data.get("merged", []), data.get("started", 0.0),
                   data.get("finished", 0.0), data.get("tracking", {}), data.get("registry", {}),
                   data.get("batch_key", ""), data.get("mlflow_run_id"), data.get("links", {}))


# --------------------------------------------------------------------------- evaluation
def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def job_fidelity(bundle: Bundle, record, models: Sequence) -> dict:
    """The fidelity metric of a finished bundle, after the fact: its samples and maps, and its training images
    (and masks) read again from the dataset its spec.json names (checked against the hashes in it)."""
    from mcpl.errors import BundleError, MCPLError
    from mcpl.job.run import bundle_fidelity
    from mcpl.pipeline.data.jobs import JobSpec

    spec = bundle.spec()
    if not isinstance(spec, dict) or not spec.get("dataset"):
        raise BundleError("its spec.json names no dataset, so its training images cannot be found")
    try:
        inputs = JobSpec.from_dict(spec).load_inputs()
    except MCPLError as err:
        raise BundleError(f"its training images in {spec['dataset']} are not reachable: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"its spec.json is malformed: {err}") from None
    return bundle_fidelity(bundle, record, inputs, models)


def evaluate_batch(batch_dir: str | Path, out_dir: str | Path, fidelity_models: Sequence[str | None] = (),
                   device: str | None = None) -> dict:
    """Write metrics.json, concepts.csv, loss.csv and overlays/ for the jobs of one batch summary.

    `fidelity_models` (local DINOv2 / DINO / CLIP folders) computes the fidelity metric
    (mcpl.concepts.fidelity) of every job from its bundle and its training images, in place of the
    values its job.json holds; without them, the values job.json holds (computed during the job) are
    reported. Bundles are never changed. A job that cannot be scored is named in the result's
    `fidelity_notes`; when none can, a BundleError says why.
    """
    from mcpl.concepts.fidelity import is_fidelity_key, load_models
    from mcpl.errors import BundleError, MCPLError

    batch_dir, out = Path(batch_dir), Path(out_dir)
    if not (batch_dir / SUMMARY_FILE).is_file():
        raise FileNotFoundError(f"{batch_dir / SUMMARY_FILE} not found; run `mcpl batch --out {batch_dir}` first")
    summary = BatchSummary.read(batch_dir)
    models = load_models(fidelity_models, device) if any(fidelity_models) else []
    notes: list[str] = []
    shutil.rmtree(out / "overlays", ignore_errors=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    concept_rows: list[dict] = []
    losses: dict[int, list[float]] = {}
    seconds, final_losses = 0.0, []
    for job in summary.jobs:
        if not job.ok:
            continue
        bundle = Bundle(inside(batch_dir, job.out_dir))
        record = bundle.record()
        label = re.sub(r"[^A-Za-z0-9_.-]", "_", f"g-{job.group}") if job.group else f"row{job.rows[0]:03d}"
        seconds += float(record.train_seconds or 0.0)
        if record.final_loss is not None:
            final_losses.append(float(record.final_loss))
        for entry in record.history:
            losses.setdefault(int(entry["step"]), []).append(float(entry["loss"]))
        per_image = record.metrics
        if models:
            try:
                computed = job_fidelity(bundle, record, models)
            except MCPLError as err:
                notes.append(f"job {job.job_id} ({_label(job)}): no fidelity: {err}")
                computed = {}
            per_image = {key: {token: {k: v for k, v in values.items() if not is_fidelity_key(k)}
                               for token, values in per_token.items()} for key, per_token in record.metrics.items()}
            for key, per_token in computed.items():
                for token, values in per_token.items():
                    per_image.setdefault(key, {}).setdefault(token, {}).update(values)
        for i, image in enumerate(record.images):
            src = bundle.file(image.overlay)
            if src.is_file():
                shutil.copyfile(src, out / "overlays" / f"{label}_image{i}.png")
            for token, values in per_image.get(f"image_{i}", {}).items():
                scores = {k: round(float(v), 4) for k, v in values.items()
                          if (k in METRIC_KEYS or is_fidelity_key(k)) and isinstance(v, int | float)}
                if scores:
                    concept_rows.append({"concept": f"{label}/{i}/{token}", "job_id": job.job_id,
                                         "rows": " ".join(map(str, job.rows)), "image": image.source,
                                         "token": token, **scores})
    if models and notes and not any(is_fidelity_key(k) for r in concept_rows for k in r):
        raise BundleError("no job of the batch could be scored for fidelity:\n  " + "\n  ".join(notes))
    fidelity_keys = sorted({k for r in concept_rows for k in r if is_fidelity_key(k)})
    _write_csv(out / "concepts.csv", concept_rows,
               ["concept", *METRIC_KEYS, *fidelity_keys, "job_id", "rows", "image", "token"])
    _write_csv(out / "loss.csv", [{"step": s, "loss": round(sum(v) / len(v), 5)} for s, v in sorted(losses.items())],
               ["step", "loss"])
    scored = [r for r in concept_rows if fidelity_keys and any(k in r for k in fidelity_keys)]
    fidelity = {"concepts": len(scored), **{k: _mean([r[k] for r in scored if k in r]) for k in fidelity_keys},
                # the source object was cut by the ground-truth mask where the job had one (it then has an IoU)
                "ground_truth_masks": sum(1 for r in scored if "iou" in r)}
    if models:
        fidelity["jobs_unscored"] = len(notes)
    concept_rows = [r for r in concept_rows if "iou" in r]  # the attention metrics need a ground-truth mask
    ious = [r["iou"] for r in concept_rows]
    metrics = {
        "jobs": {"total": len(summary.jobs), "trained": summary.count("done"),
                 "skipped": summary.count("skipped"), "failed": summary.count("failed")},
        "rows_rejected": len(summary.rejected),
        "attention": {
            "concepts": len(concept_rows),
            **{k: _mean([r[k] for r in concept_rows]) for k in METRIC_KEYS},
            # a concept is separated when its map overlaps its own mask more than any other's
            "separated": _mean([1.0 if r["iou"] > r["iou_other"] else 0.0 for r in concept_rows]),
            "iou_min": round(min(ious), 4) if ious else None,
        },
        "train": {"final_loss": _mean(final_losses)},
    }
    if scored or models:
        metrics["fidelity"] = fidelity
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    volatile = {"train": {"seconds": round(seconds, 1)}, **({"fidelity_notes": notes} if notes else {})}
    write_json(run_file(out / "metrics.json"), volatile)  # not DVC metrics
    return {**metrics, "train": {**metrics["train"], "seconds": round(seconds, 1)},
            **({"fidelity_notes": notes} if notes else {})}


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
