"""A job's folder: the only module that knows its file names, its records and how they are written.

    jobs/<job_id>/                    a batch keeps one bundle per job under its folder
      job.json                        JobRecord: what was learned, from what, settings, metrics (done marker)
      run.json                        the record's volatile part: seconds, git revision (DVC ignores it)
      spec.json                       the pipeline's JobSpec that made it (dataset, rows, group)
      outcome.json                    JobOutcome of the last attempt (read back by a parent process)
      error.log / job.log             traceback of a failed attempt / output of a job process
      embeddings.safetensors          every learned token of the job (MCPL-all words included)
      concepts/<name>/learned_embeds.safetensors   one per concept (diffusers' format + metadata)
      concepts/<name>/concept.json, overlay.png, sample.png   its registry card
      attention/image_<i>.safetensors, .png        maps on the training images and their overlays
      samples/<name>.png, composed.png, all.png    generations with the learned words
      samples/<name>/<k>.png, maps.safetensors     each generation of a concept, its attention (fidelity)
      checkpoints/                    resumable state (safe to delete once done)
    summary.json                      a batch's outcome (pipeline.report writes it, through `write_json`)

Like diffusers' loader constants, every name is spelled here once; everything else asks
`Bundle`. Paths read from a bundle's own files are resolved inside the bundle, so a
tampered job.json cannot point anywhere else. JSON files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from mcpl.concepts.embeddings import EMBEDS_FILE
from mcpl.errors import BundleError

JOB_FILE = "job.json"
RUN_FILE = "run.json"
# What differs between two runs of the same work: kept beside job.json, not in it, so that a rerun (a
# fresh clone's `dvc repro`) writes a byte-identical job.json. Bundle.record() puts them back.
VOLATILE_FIELDS = ("train_seconds", "wall_seconds", "git_rev")
SPEC_FILE = "spec.json"
OUTCOME_FILE = "outcome.json"
ERROR_LOG = "error.log"
JOB_LOG = "job.log"
SUMMARY_FILE = "summary.json"
JOBS_DIR = "jobs"
EMBEDDINGS_FILE = "embeddings.safetensors"
CONCEPTS_DIR = "concepts"
ATTENTION_DIR = "attention"
SAMPLES_DIR = "samples"
CHECKPOINTS_DIR = "checkpoints"
CARD_FILE = "concept.json"
OVERLAY_FILE = "overlay.png"
SAMPLE_FILE = "sample.png"


# ------------------------------------------------------------------------------- JSON I/O
def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temp file in the same folder, then rename): readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
    return path


def read_json(path: str | Path) -> Any:
    """Read a JSON file of a bundle; a missing or unparsable file is a BundleError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"cannot read {path}: {err}") from None


def inside(root: str | Path, relative: object) -> Path:
    """`root / relative`, refusing anything (absolute, `..`, symlinks) that leaves root."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise BundleError(f"bad path {relative!r} in the bundle at {root}")
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise BundleError(f"path {relative!r} in the bundle at {root} leaves the bundle; refusing it")
    return target


def portable_path(path: str | Path) -> str:
    """`path` as a record keeps it: relative to the current folder when inside it (so a clone of the
    project at another place writes the same bytes: DVC outputs, dvc.lock), else absolute."""
    target, here = Path(path).resolve(), Path.cwd().resolve()
    return target.relative_to(here).as_posix() if target.is_relative_to(here) else str(target)


def _known(cls: type, data: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


# ------------------------------------------------------------------------------- records
@dataclass
class ConceptEntry:
    """One concept of a job: its token, name (folder), initializer, adjective and embedding file."""

    token: str
    name: str
    initializer: str
    adjective: str | None
    file: str  # relative to the bundle


@dataclass
class ImageEntry:
    """One training image of a job: where it came from, its sentence, pixel hash and overlay."""

    source: str
    sentence: str
    hash: str
    overlay: str  # relative to the bundle


@dataclass
class JobRecord:
    """job.json: a finished job. Its presence with the right job_id is what "done" means."""

    job_id: str
    base_model: str
    base_model_hash: str
    strategy: str
    seed: int
    steps: int
    config_hash: str
    config: dict
    learning_rate: float
    attention_layers: list[str]
    concepts: list[ConceptEntry]
    images: list[ImageEntry]
    metrics: dict = field(default_factory=dict)  # image_<i> -> token -> {iou, iou_other, share}
    final_loss: float = float("nan")
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    samples: dict = field(default_factory=dict)  # name -> {prompt, file}
    git_rev: str = "unknown"
    family: str = "sd"  # the model family (mcpl.method.families): sd, sdxl, ldm
    widths: list[int] = field(default_factory=list)  # embedding width of each text stack
    learning_rates: list[float] = field(default_factory=list)  # per text stack

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> JobRecord:
        try:
            known = _known(cls, data)
            known["concepts"] = [ConceptEntry(**_known(ConceptEntry, c)) for c in data["concepts"]]
            known["images"] = [ImageEntry(**_known(ImageEntry, i)) for i in data["images"]]
            return cls(**known)
        except (KeyError, TypeError, AttributeError) as err:
            raise BundleError(f"job.json is incomplete or malformed: {err}") from None

    def concept(self, token: str) -> ConceptEntry:
        return next(c for c in self.concepts if c.token == token)

    def images_of(self, concept: ConceptEntry) -> list[ImageEntry]:
        """The training images whose sentence marks this concept (all images if none says so)."""
        marked = [i for i in self.images if concept.token in i.sentence or f"<{concept.name}" in i.sentence]
        return marked or list(self.images)


class JobStatus(str, Enum):
    """What happened to a job in a batch."""

    DONE = "done"  # trained now
    SKIPPED = "skipped"  # finished before (same job id), not trained again
    FAILED = "failed"  # raised; its error says why

    def __str__(self) -> str:
        return self.value


@dataclass
class JobOutcome:
    """The result of one attempt at a job: one type for the runner, the flow, the summary and MLflow."""

    job_id: str
    status: JobStatus
    rows: list[int]
    images: list[str]
    group: str | None
    out_dir: str  # relative to the batch folder
    seconds: float = 0.0
    error: str | None = None
    concepts: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    resumed_from: int = 0  # checkpoint step the attempt started from (0: fresh)
    run_id: str | None = None  # its MLflow run, when tracked
    device: str = ""
    worker: str = ""
    pid: int = 0
    first_step: int | None = None  # the first step this attempt trained (None: it trained nothing)

    @property
    def ok(self) -> bool:
        return self.status is not JobStatus.FAILED

    def fill(self, record: JobRecord) -> None:
        self.concepts = [c.token for c in record.concepts]
        self.metrics = record.metrics

    def to_dict(self) -> dict:
        data = asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict) -> JobOutcome:
        known = _known(cls, data)
        known["status"] = JobStatus(known["status"])
        return cls(**known)


# ------------------------------------------------------------------------------- the folder
def job_id(image_hashes: Sequence[str], sentences: Sequence[str], config_hash: str, model_hash: str) -> str:
    """Stable id from content + config + model: the same work always gets the same id."""
    key = json.dumps([list(image_hashes), list(sentences), config_hash, model_hash])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class Bundle:
    """One job's folder. Every path of it, and every record in it, comes from here."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, batch_root: str | Path, job: str) -> Bundle:
        """The bundle of job `job` inside a batch folder."""
        return cls(Path(batch_root) / JOBS_DIR / job)

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r})"

    # ---- paths
    @property
    def job_file(self) -> Path:
        return self.path / JOB_FILE

    @property
    def spec_file(self) -> Path:
        return self.path / SPEC_FILE

    @property
    def outcome_file(self) -> Path:
        return self.path / OUTCOME_FILE

    @property
    def error_log(self) -> Path:
        return self.path / ERROR_LOG

    @property
    def job_log(self) -> Path:
        return self.path / JOB_LOG

    @property
    def embeddings_file(self) -> Path:
        return self.path / EMBEDDINGS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def concepts_dir(self) -> Path:
        return self.path / CONCEPTS_DIR

    @property
    def attention_dir(self) -> Path:
        return self.path / ATTENTION_DIR

    @property
    def samples_dir(self) -> Path:
        return self.path / SAMPLES_DIR

    @staticmethod
    def concept_rel(name: str) -> str:
        return f"{CONCEPTS_DIR}/{name}/{EMBEDS_FILE}"

    @staticmethod
    def overlay_rel(image_index: int) -> str:
        return f"{ATTENTION_DIR}/image_{image_index}.png"

    @staticmethod
    def sample_rel(name: str) -> str:
        return f"{SAMPLES_DIR}/{name}.png"

    @staticmethod
    def sample_image_rel(name: str, k: int) -> str:
        """The k-th generation of a concept's sample prompt, full size (the fidelity metric reads it)."""
        return f"{SAMPLES_DIR}/{name}/{k}.png"

    @staticmethod
    def sample_maps_rel(name: str) -> str:
        """The concept's attention in each of its generations: {token: (k, h, w)}."""
        return f"{SAMPLES_DIR}/{name}/maps.safetensors"

    def attention_maps_file(self, image_index: int) -> Path:
        return self.attention_dir / f"image_{image_index}.safetensors"

    def concept_folder(self, name: str) -> Path:
        return inside(self.path, f"{CONCEPTS_DIR}/{name}")

    def file(self, relative: str) -> Path:
        """A path that a record of this bundle names, resolved inside the bundle."""
        return inside(self.path, relative)

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    def artifacts(self) -> list[tuple[Path, str | None]]:
        """What a tracker logs of a finished bundle: (path, artifact folder)."""
        files = [(p, None) for p in (self.job_file, self.run_file, self.embeddings_file) if p.exists()]
        return files + [(d, d.name) for d in (self.concepts_dir, self.attention_dir, self.samples_dir) if d.is_dir()]

    # ---- records
    def record(self) -> JobRecord:
        data = read_json(self.job_file)
        if isinstance(data, dict) and self.run_file.exists():
            run = read_json(self.run_file)
            data.update({k: run[k] for k in VOLATILE_FIELDS if isinstance(run, dict) and k in run})
        return JobRecord.from_dict(data)

    def write_record(self, record: JobRecord) -> Path:
        """job.json (the result) and run.json (its volatile fields); run.json first, so a job.json
        on disk always has its run.json."""
        data = record.to_dict()
        write_json(self.run_file, {k: data.pop(k) for k in VOLATILE_FIELDS})
        return write_json(self.job_file, data)

    def is_done(self, job: str) -> JobRecord | None:
        """The record if this bundle is finished work for job id `job`, else None."""
        if not self.job_file.exists():
            return None
        try:
            record = self.record()
        except BundleError:
            return None
        return record if record.job_id == job else None

    def write_spec(self, spec: dict) -> Path:
        """spec.json, its dataset folder kept relative to this bundle (so a clone of the project at
        another place writes the same bytes); `spec()` gives it back absolute."""
        data = dict(spec)
        if isinstance(data.get("dataset"), str) and data["dataset"]:
            data["dataset"] = os.path.relpath(Path(data["dataset"]).resolve(), self.path.resolve())
        return write_json(self.spec_file, data)

    def spec(self) -> dict:
        data = read_json(self.spec_file) if self.spec_file.exists() else {}
        if isinstance(data, dict) and isinstance(data.get("dataset"), str) and data["dataset"] \
                and not os.path.isabs(data["dataset"]):
            data["dataset"] = str((self.path / data["dataset"]).resolve())
        return data

    def write_outcome(self, outcome: JobOutcome) -> Path:
        return write_json(self.outcome_file, outcome.to_dict())

    def outcome(self) -> JobOutcome | None:
        if not self.outcome_file.exists():
            return None
        try:
            return JobOutcome.from_dict(read_json(self.outcome_file))
        except (BundleError, KeyError, ValueError, TypeError):
            return None

    def write_error(self, text: str) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        self.error_log.write_text(text)
        return self.error_log

    def clear_error(self) -> None:
        self.error_log.unlink(missing_ok=True)

    def concept_files(self, record: JobRecord | None = None) -> dict[str, Path]:
        """token -> its embedding file (resolved inside the bundle)."""
        record = record or self.record()
        return {c.token: self.file(c.file) for c in record.concepts}


def find_bundles(root: str | Path) -> list[Bundle]:
    """Job bundles at or under `root` (a bundle, a batch folder, or any folder of them).

    A batch folder's summary.json names the jobs of its latest run: only those count, so
    bundles kept from earlier runs (other configs or models) are not picked up again.
    Folders the summary names are resolved inside the batch folder.
    """
    root = Path(root)
    if (root / JOB_FILE).exists():
        return [Bundle(root)]
    summary = root / SUMMARY_FILE
    if summary.exists():
        data = read_json(summary)
        jobs = data.get("jobs", []) if isinstance(data, dict) else None
        if not isinstance(jobs, list) or not all(isinstance(j, dict) for j in jobs):
            raise BundleError(f"{summary} has no list of jobs; it is not a batch summary (or was tampered with)")
        listed = []
        for job in jobs:
            if job.get("status") in (JobStatus.DONE.value, JobStatus.SKIPPED.value) and job.get("out_dir"):
                folder = inside(root, job["out_dir"])
                if (folder / JOB_FILE).exists():
                    listed.append(folder)
        return [Bundle(d) for d in sorted(set(listed))]
    base = root.resolve()
    return [Bundle(p.parent) for p in sorted(root.rglob(JOB_FILE))
            if CHECKPOINTS_DIR not in p.parts and p.parent.resolve().is_relative_to(base)]
