"""Prefect orchestration of mcpl: flow `mcpl` (deployment `batch`) and flow `mcpl-job` (one job).

Thin by design: what a job does lives in `mcpl/`; here are only fan-out, device pinning,
retries, and where results and logs go.
"""
