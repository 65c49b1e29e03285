"""The DVC pipeline in a throwaway copy of the repo: `dvc repro` end to end on a tiny model,
then a changed param re-runs only the stages that depend on it; a clone of it elsewhere
reproduces it byte for byte (dvc.lock unchanged)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mcpl.cli import COMMANDS
from mcpl.method.tiny import build_tiny_model
from mcpl.provenance import REPO_ROOT

REPO = REPO_ROOT
FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", "data/.gitignore",
         "mcpl/pipeline/data/example.py",
         "mcpl/toyworld/dataset.py", "mcpl/toyworld/render.py")
HAS_REGISTRY = "registry" in COMMANDS


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd, check)


def set_param(repo: Path, key: str, value: str) -> None:
    """Change `key: value` in params.yaml (first match, comments kept)."""
    path = repo / "params.yaml"
    text, n = re.subn(rf"(?m)^(\s*{re.escape(key)}:) [^#\n]*?(\s*#.*)?$", rf"\g<1> {value}\g<2>", path.read_text(),
                      count=1)
    assert n == 1, key
    path.write_text(text)


# Until `mcpl registry` exists, the registry stage is left out (evaluate does not depend on it).
TARGETS = [] if HAS_REGISTRY else ["evaluate"]


def repro(repo: Path) -> str:
    proc = dvc("repro", *TARGETS, cwd=repo)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("clone")
    for name in FILES:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    if (REPO / "data" / "example").is_dir():
        shutil.copytree(REPO / "data" / "example", repo / "data" / "example")
    build_tiny_model(repo / "models" / "tiny")
    set_param(repo, "model", "models/tiny")
    set_param(repo, "scenes", "1")
    set_param(repo, "steps", "2")
    set_param(repo, "samples", "0")
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "fresh clone"], repo)
    return repo


def test_repro_then_only_dependent_stages_rerun(repo):
    out = repro(repo)
    for stage in ("prepare", "validate", "train", "evaluate", *(["registry"] if HAS_REGISTRY else [])):
        assert f"Running stage '{stage}'" in out, out
    if HAS_REGISTRY:
        assert "5 new version(s)" in (repo / "outputs" / "registry.log").read_text()
        assert (repo / "mlflow.db").exists()
    assert "Data and pipelines are up to date" in dvc("status", *TARGETS, cwd=repo).stdout
    run(["mcpl", "data", "validate", "data/example", "--model", "models/tiny"], repo)  # README's first step
    assert (repo / "data" / "example" / "manifest.parquet").exists()
    assert "Data and pipelines are up to date" in dvc("status", *TARGETS, cwd=repo).stdout  # .dvcignore'd
    assert "manifest" not in run(["git", "status", "--short"], repo).stdout  # data/.gitignore
    metrics = json.loads(dvc("metrics", "show", "--json", cwd=repo).stdout)
    values = next(iter(metrics.values()))["data"]["outputs/eval/metrics.json"]["data"]
    assert values["jobs"] == {"total": 2, "trained": 2, "skipped": 0, "failed": 0}
    assert values["attention"]["concepts"] == 6 and 0 <= values["attention"]["iou"] <= 1
    plots = dvc("plots", "show", "-o", "plots_html", cwd=repo)
    assert (repo / "plots_html" / "index.html").exists(), plots.stdout
    html = (repo / "plots_html" / "index.html").read_text()
    assert "Attention IoU of each learned concept" in html and "Mean training loss" in html
    assert {p.name for p in (repo / "plots_html" / "static").iterdir()} == {
        f"workspace_outputs_eval_overlays_{n}.png" for n in ("row001_image0", "g-red-circle_image0",
                                                              "g-red-circle_image1")}
    first_jobs = set(os.listdir(repo / "outputs" / "batch" / "jobs"))

    set_param(repo, "steps", "3")
    status = json.loads(dvc("status", "--json", "--with-deps", *TARGETS, cwd=repo).stdout)
    assert "train" in status and not {"prepare", "validate"} & set(status), status
    out = repro(repo)
    assert "Stage 'prepare' didn't change, skipping" in out and "Stage 'validate' didn't change, skipping" in out
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'registry'" in out or not HAS_REGISTRY
    summary = json.loads((repo / "outputs" / "batch" / "summary.json").read_text())
    assert summary["counts"]["done"] == 2  # a new config: new job ids, trained
    assert first_jobs < set(os.listdir(repo / "outputs" / "batch" / "jobs"))  # persisted, not wiped


@pytest.mark.slow
def test_own_dataset_with_dvc_add_and_partial_rerun(repo):
    """A changed validate param re-runs validate and train, but train skips every job (same ids);
    then the docs' flow: copy in a dataset, `dvc add` it, point params at it, add a row later."""
    repro(repo)
    set_param(repo, "max_pixels", "30000000")
    out = repro(repo)
    assert "Stage 'prepare' didn't change, skipping" in out and "Running stage 'validate'" in out
    summary = json.loads((repo / "outputs" / "batch" / "summary.json").read_text())
    assert summary["counts"]["skipped"] == len(summary["jobs"]) and summary["counts"]["done"] == 0

    mine = repo / "data" / "mine"
    shutil.copytree(repo / "data" / "example", mine)
    dvc("add", "data/mine", cwd=repo)
    set_param(repo, "dataset", "data/mine")
    repro(repo)
    rows = (mine / "rows.jsonl").read_text().splitlines()
    extra = json.loads(rows[0])
    extra["sentence"] = extra["sentence"].replace("<obj1|", "<first|")
    extra["masks"] = {k.replace("obj1", "first"): v for k, v in extra["masks"].items()}
    (mine / "rows.jsonl").write_text("\n".join(rows + [json.dumps(extra)]) + "\n")
    dvc("add", "data/mine", cwd=repo)
    out = repro(repo)
    assert "Running stage 'validate'" in out and "Running stage 'train'" in out
    summary = json.loads((repo / "outputs" / "batch" / "summary.json").read_text())
    assert summary["counts"]["done"] == 1 and summary["counts"]["skipped"] == len(summary["jobs"]) - 1


@pytest.mark.slow
def test_fresh_clone_repro_leaves_dvc_lock_unchanged(tmp_path_factory):
    """Commit a repro'd pipeline, clone it to another path, `dvc repro` there: every output is the same
    bytes (no times, process ids, absolute paths or random header orders in them), so git stays clean."""
    first = tmp_path_factory.mktemp("first")
    for name in (*FILES, ".gitignore"):
        (first / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, first / name)
    shutil.copytree(REPO / "data" / "example", first / "data" / "example")
    build_tiny_model(first / "models" / "tiny")
    for key, value in (("model", "models/tiny"), ("scenes", "1"), ("steps", "2"), ("sample_steps", "2")):
        set_param(first, key, value)
    run(["git", "init", "-q"], first)
    repro(first)
    run(["git", "add", "-A"], first)
    run(["git", "commit", "-qm", "pipeline and its dvc.lock"], first)
    clone = tmp_path_factory.mktemp("elsewhere") / "clone"
    run(["git", "clone", "-q", str(first), str(clone)], first)
    out = repro(clone)
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out  # outputs are not in git
    assert run(["git", "status", "--short"], clone).stdout == "", run(["git", "diff"], clone).stdout[-3000:]
    assert (clone / "outputs" / "batch" / "summary.run.json").exists()  # the volatile part, beside
