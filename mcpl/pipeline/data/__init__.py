"""Datasets: a folder of images (+ masks) and one table -> validated manifest -> jobs.

    report = validate_dataset("data/example")          # writes data/example/manifest.parquet
    jobs = load_jobs(report.manifest, ConfigSource(), model)

Format, limits and every error: docs/FORMAT.md and docs/DATA.md.
"""

from mcpl.errors import DatasetError, FileCheckError, StaleInputError
from mcpl.pipeline.data.files import DEFAULT_MAX_PIXELS, ImageInfo, open_image, resolve_inside
from mcpl.pipeline.data.table import COLUMNS, OPTIONAL, REQUIRED
from mcpl.pipeline.data.validate import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA,
    RowResult,
    ValidationReport,
    read_manifest,
    validate_dataset,
)

__all__ = [
    "COLUMNS",
    "DEFAULT_MAX_PIXELS",
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA",
    "OPTIONAL",
    "REQUIRED",
    "DatasetError",
    "FileCheckError",
    "ImageInfo",
    "JobSpec",
    "RowResult",
    "StaleInputError",
    "ValidationReport",
    "JobPlan",
    "plan_jobs",
    "load_jobs",
    "open_image",
    "read_manifest",
    "rejected_rows",
    "resolve_inside",
    "validate_dataset",
]

_JOBS = {"JobPlan", "JobSpec", "load_jobs", "plan_jobs", "rejected_rows"}


def __getattr__(name: str):
    """Jobs (mcpl.pipeline.data.jobs) load on first use: they need job ids, hence torch; validating a
    dataset does not (`mcpl data validate` starts in a second, not after importing torch)."""
    if name in _JOBS:
        from mcpl.pipeline.data import jobs

        return getattr(jobs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
