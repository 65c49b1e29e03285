"""From a validated manifest to jobs: one per image, or one per MCPL-diverse group.

A job's id is `mcpl.job.bundle.job_id(image hashes, sentences, config hash, model hash)`, the same id the
engine writes into the bundle's job.json, so "done" means "a job.json with this id exists".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mcpl.config import ConfigSource, TrainConfig
from mcpl.errors import DatasetError, StaleInputError
from mcpl.job.bundle import job_id
from mcpl.method.inputs import JobInput, image_hash
from mcpl.method.model_files import model_hash
from mcpl.pipeline.data.files import DEFAULT_MAX_PIXELS, load_image, load_mask
from mcpl.pipeline.data.validate import read_manifest


@dataclass
class JobSpec:
    """Everything needed to run one job, JSON-able (Prefect parameters, batch summaries)."""

    job_id: str
    dataset: str  # dataset root, absolute
    rows: list[int]  # table rows as users count them (1-based data rows)
    images: list[str]  # relative to the dataset root
    sentences: list[str]
    masks: list[dict[str, str]]  # per image: {"<name>": relative mask path}
    group: str | None
    config: TrainConfig
    model: str
    image_hashes: list[str] = field(default_factory=list)  # from the manifest; checked on load
    max_pixels: int = DEFAULT_MAX_PIXELS

    def load_inputs(self) -> list[JobInput]:
        """Load images and masks (paths re-resolved inside the root, same checks as validation)."""
        root = Path(self.dataset)
        inputs = []
        for i, (rel, sentence) in enumerate(zip(self.images, self.sentences, strict=True)):
            image, _ = load_image(root, rel, self.max_pixels)
            if self.image_hashes and image_hash(image) != self.image_hashes[i]:
                raise StaleInputError(f"{rel} (row {self.rows[i]}) changed since validation; "
                                      "run `mcpl data validate` again")
            masks = {tok: load_mask(root, path, self.max_pixels)[0]
                     for tok, path in (self.masks[i] if i < len(self.masks) else {}).items()}
            inputs.append(JobInput.from_text(image, sentence, source=rel, masks=masks))
        return inputs

    def to_dict(self) -> dict:
        return {"job_id": self.job_id, "dataset": self.dataset, "rows": list(self.rows),
                "images": list(self.images), "sentences": list(self.sentences),
                "masks": [dict(m) for m in self.masks], "group": self.group,
                "config": self.config.model_dump(mode="json"), "model": self.model,
                "image_hashes": list(self.image_hashes), "max_pixels": self.max_pixels}

    @classmethod
    def from_dict(cls, d: dict) -> JobSpec:
        return cls(job_id=d["job_id"], dataset=d["dataset"], rows=[int(r) for r in d["rows"]],
                   images=list(d["images"]), sentences=list(d["sentences"]),
                   masks=[dict(m) for m in d.get("masks") or [{} for _ in d["images"]]],
                   group=d.get("group"), config=TrainConfig(**d["config"]), model=d["model"],
                   image_hashes=list(d.get("image_hashes") or []),
                   max_pixels=int(d.get("max_pixels") or DEFAULT_MAX_PIXELS))

    @property
    def label(self) -> str:
        """Short human description: 'row 3' or "group 'g' (rows 5, 6)"."""
        rows = ", ".join(map(str, self.rows))
        return f"group {self.group!r} (rows {rows})" if self.group else f"row {rows}"


def dataset_root(manifest_path: Path, meta: dict[str, str]) -> Path:
    """The dataset folder of a manifest: relative to the manifest if it exists there, else absolute."""
    relative = manifest_path.resolve().parent / meta.get("dataset_relative", "")
    if meta.get("dataset_relative") and relative.is_dir():
        return relative.resolve()
    absolute = Path(meta.get("dataset", ""))
    if absolute.is_dir():
        return absolute.resolve()
    raise DatasetError(f"the dataset of {manifest_path} ({meta.get('dataset')}) is gone; validate again")


@dataclass
class JobPlan:
    """A manifest as work: the jobs, the rows merged into another row's job, and the rejected rows."""

    jobs: list[JobSpec]
    merged: list[dict] = field(default_factory=list)  # {"row", "duplicate_of": [rows], "job_id"}
    rejected: list[dict] = field(default_factory=list)
    table_rows: int = 0  # rows of the table: the jobs' rows, merged and rejected rows add up to it

    def accounted(self) -> int:
        """How many table rows the plan accounts for (always `table_rows`: plan_jobs checks it)."""
        return sum(len(j.rows) for j in self.jobs) + len(self.merged) + len(self.rejected)


def plan_jobs(manifest_path: str | Path, source: ConfigSource | TrainConfig, model: str) -> JobPlan:
    """The valid rows of a manifest as jobs (table order), each with its final job id.

    Rows that are the same work as an earlier row under this config (same pixels, sentence
    and settings) train once; they are kept in `merged`, so a summary accounts for every row.
    """
    if isinstance(source, TrainConfig):
        source = ConfigSource(fields=source.model_dump())
    manifest_path = Path(manifest_path)
    rows, meta = read_manifest(manifest_path)
    root = dataset_root(manifest_path, meta)
    max_pixels = int(meta.get("max_pixels") or DEFAULT_MAX_PIXELS)
    by_key: dict[str, list[dict]] = {}
    unplanned: list[dict] = []
    for row in rows:
        if row["status"] == "ok" and row["job_key"]:
            by_key.setdefault(row["job_key"], []).append(row)
        elif row["status"] == "ok":  # never written by validate_dataset; a hand-edited manifest
            unplanned.append({"row": row["row"], "line": row["line"], "image": row["image"],
                              "sentence": row["sentence"], "errors": [],
                              "error": "(row): the manifest gives this valid row no job; validate again"})
    jobs: dict[str, JobSpec] = {}
    merged: list[dict] = []
    for members in by_key.values():
        first = members[0]
        config = source.for_job(json.loads(first["overrides"] or "{}"), first["group"])
        hashes = [m["image_hash"] for m in members]
        sentences = [m["sentence"] for m in members]
        spec = JobSpec(
            job_id=job_id(hashes, sentences, config.job_hash(), model_hash(model)), dataset=str(root),
            rows=[m["row"] for m in members], images=[m["image"] for m in members], sentences=sentences,
            masks=[{x["token"]: x["path"] for x in m["masks"] or []} for m in members], group=first["group"],
            config=config, model=model, image_hashes=hashes, max_pixels=max_pixels)
        if spec.job_id in jobs:
            merged += [{"row": r, "duplicate_of": list(jobs[spec.job_id].rows), "job_id": spec.job_id}
                       for r in spec.rows]
            continue
        jobs[spec.job_id] = spec
    plan = JobPlan(list(jobs.values()), merged, rejected_rows(manifest_path) + unplanned, len(rows))
    if plan.accounted() != plan.table_rows:  # every row has exactly one fate: a summary never loses one
        raise DatasetError(f"{manifest_path}: {plan.accounted()} row(s) planned for {plan.table_rows} table rows; "
                           "the manifest is inconsistent, validate again")
    return plan


def load_jobs(manifest_path: str | Path, source: ConfigSource | TrainConfig, model: str) -> list[JobSpec]:
    """The jobs of `plan_jobs`."""
    return plan_jobs(manifest_path, source, model).jobs


def rejected_rows(manifest_path: str | Path) -> list[dict]:
    """The manifest's rejected rows: row, line, image, sentence, errors (for summaries and reports)."""
    rows, _ = read_manifest(manifest_path)
    return [{"row": r["row"], "line": r["line"], "image": r["image"], "sentence": r["sentence"],
             "errors": r["errors"], "error": r["error"]} for r in rows if r["status"] != "ok"]
