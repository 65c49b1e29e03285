"""What a user of the served pipeline meets, without servers: the deployment's defaults are the DVC
pipeline's, batch lines without library noise, a concept's picture in its registry description,
warnings of `mcpl registry load`, and results that are the same bytes for the same work (so
`dvc repro` in a fresh clone leaves dvc.lock as it is)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mcpl.provenance import REPO_ROOT


# ------------------------------------------------------------------ one source of defaults
def test_deployment_defaults_are_the_dvc_pipelines():
    from flows.batch import batch, batch_source
    from mcpl.config import ConfigSource

    dvc = ConfigSource.from_options(str(REPO_ROOT / "params.yaml") + ":train").base()
    served = batch_source().base()
    assert served == dvc
    assert served.attn_mask and served.prompt_cl and served.bind_adj and served.steps == dvc.steps != 500
    # the UI form leaves them unset ("as params.yaml"); explicit values still win, full=False turns all off
    defaults = {k: p.default for k, p in inspect.signature(batch.fn).parameters.items()}
    assert defaults["steps"] is defaults["full"] is defaults["samples"] is defaults["sample_steps"] is None
    plain = batch_source(steps=7, full=False).base()
    assert plain.steps == 7 and not (plain.attn_mask or plain.prompt_cl or plain.bind_adj)
    assert batch_source(full=True, overrides={"bind_adj": False}).base().bind_adj is False


def test_deployment_samples_default_to_the_dvc_batch_section():
    import yaml

    from flows.batch import pipeline_defaults

    assert pipeline_defaults("batch") == yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["batch"]
    assert pipeline_defaults("train", Path("/nonexistent/params.yaml")) == {}


# ------------------------------------------------------------------ noise
def test_log_observer_silences_library_bars_and_notices(monkeypatch):
    for name in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.delenv(name, raising=False)
    import logging

    import transformers
    from diffusers.utils import logging as diffusers_logging
    from mlflow.environment_variables import (
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR,
        MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
    )

    from mcpl.pipeline.progress import LogObserver

    transformers.logging.enable_progress_bar()
    diffusers_logging.enable_progress_bar()
    lines: list[str] = []
    LogObserver(lines.append)
    assert not transformers.logging.is_progress_bar_enabled() and not diffusers_logging.is_progress_bar_enabled()
    assert not MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() and MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get()
    assert logging.getLogger("mlflow.store.model_registry.abstract_store").getEffectiveLevel() >= logging.WARNING
    assert lines == []


# ------------------------------------------------------------------ the concept's picture
def test_registry_description_shows_the_concepts_pictures(bundle):
    from mcpl.job.cards import concept_cards

    card = concept_cards(bundle.bundle)[0]
    plain = card.description()
    assert "get-artifact" not in plain
    text = card.description("abc123")
    assert text.startswith(plain)
    assert f"![attention of {card.concept}](get-artifact?path=concepts/{card.concept}/overlay.png&run_uuid=abc123)" \
        in text
    assert f"(get-artifact?path=concepts/{card.concept}/sample.png&run_uuid=abc123)" in text


# ------------------------------------------------------------------ registry load warnings
@pytest.fixture(scope="module")
def loaded(tiny_model, bundle):
    from mcpl.concepts.generate import load_concepts, load_pipeline

    pipe = load_pipeline(tiny_model, "cpu")
    tokens = load_concepts(pipe, [f for f in bundle.bundle.concept_files().values()])
    return pipe, tokens


def test_load_warns_when_the_prompt_uses_no_loaded_token(loaded):
    from mcpl.concepts.generate import prompt_warnings

    pipe, tokens = loaded
    assert prompt_warnings(pipe, f"a photo of {tokens[0]}", tokens) == []
    (warning,) = prompt_warnings(pipe, "a photo of a cat", tokens)
    assert "uses none of the loaded tokens" in warning and tokens[0] in warning


def test_load_warns_when_the_prompt_is_cut_off(loaded):
    from mcpl.concepts.generate import prompt_warnings

    pipe, tokens = loaded
    limit = pipe.tokenizer.model_max_length
    long_prompt = "a photo of a red square and " * limit + tokens[1]
    (warning,) = prompt_warnings(pipe, long_prompt, tokens)
    assert f"reads {limit}" in warning and f"including {tokens[1]}" in warning
    early = tokens[0] + " and a photo of a red square" * limit
    (warning,) = prompt_warnings(pipe, early, tokens)
    assert "cut off" in warning and "including" not in warning


def test_load_into_pipeline_warns_library_users(tiny_model, bundle, monkeypatch):
    import mcpl.pipeline.registry.refs as refs
    from mcpl.concepts.generate import load_pipeline

    files = bundle.bundle.concept_files()
    found = [refs.LoadedConcept(f"x.{i}", f"x.{i}", "1", token, token, path.parent)
             for i, (token, path) in enumerate(files.items())]
    monkeypatch.setattr(refs, "fetch", lambda *a, **k: found)
    with pytest.warns(UserWarning, match="none of the loaded tokens"):
        refs.load_into_pipeline(load_pipeline(tiny_model, "cpu"), ["x.0", "x.1"], prompt="a photo of a cat")


# ------------------------------------------------------------------ same work, same bytes
def test_summary_json_holds_results_only(tmp_path):
    from mcpl.job.bundle import JobOutcome, JobStatus
    from mcpl.pipeline.report import BatchSummary

    def summary(started: float, pid: int) -> BatchSummary:
        job = JobOutcome("j1", JobStatus.DONE, [1], ["a.png"], None, "jobs/j1", seconds=started / 10, pid=pid,
                         worker=f"host{pid}", concepts=["<a>"])
        return BatchSummary(str(tmp_path), [job], started=started, finished=started + 5)

    first = summary(100.0, 1).write().read_bytes()
    second = summary(200.0, 2).write().read_bytes()
    assert first == second
    data = json.loads(first)
    assert not {"started", "finished", "out_root"} & set(data)
    assert not {"seconds", "pid", "worker"} & set(data["jobs"][0])
    back = BatchSummary.read(tmp_path)
    assert back.started == 200.0 and back.jobs[0].pid == 2 and back.jobs[0].seconds == 20.0
    assert back.to_dict()["jobs"][0]["worker"] == "host2" and back.out_root == str(tmp_path)


def test_job_json_holds_results_only(bundle, tmp_path):
    import shutil

    from mcpl.job.bundle import Bundle

    copy = Bundle(shutil.copytree(bundle.bundle.path, tmp_path / "b"))
    record = copy.record()
    assert record.train_seconds > 0 and record.git_rev != "unknown"
    stored = json.loads(copy.job_file.read_text())
    assert not {"train_seconds", "wall_seconds", "git_rev"} & set(stored)
    record.train_seconds, record.git_rev = 123.0, "other"
    before = copy.job_file.read_bytes()
    copy.write_record(record)
    assert copy.job_file.read_bytes() == before and copy.record().train_seconds == 123.0


def test_safetensors_headers_are_the_same_bytes_in_every_process(tmp_path):
    """safetensors writes its metadata map in a per-process random order; ours sorts it."""
    code = ("import sys, torch; from mcpl.concepts.embeddings import save_file; "
            "save_file({'<a>': torch.ones(2, 4), '<b>': torch.zeros(1, 4)}, sys.argv[1], "
            "{k: k * 3 for k in 'abcdefghijklmnop'})")
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True, env={**os.environ, "PYTHONHASHSEED": "random"})
    assert len({f.read_bytes() for f in files}) == 1
    from safetensors import safe_open  # still a valid safetensors file

    with safe_open(str(files[0]), "pt") as fh:
        assert fh.metadata()["p"] == "ppp" and fh.get_tensor("<a>").sum() == 8


def test_paths_in_records_are_relative_inside_the_project(tmp_path, monkeypatch):
    from mcpl.job.bundle import portable_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "x").mkdir(parents=True)
    assert portable_path(tmp_path / "data" / "x") == "data/x"
    assert portable_path("/usr/lib") == "/usr/lib"
