"""From manifest to jobs: stable ids, JSON round trip, safe re-loading of inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from helpers.data import add_good_files, scene, write_jsonl

from mcpl.config import TrainConfig
from mcpl.job.bundle import job_id
from mcpl.method.model_files import model_hash
from mcpl.pipeline.data import FileCheckError, JobSpec, StaleInputError, load_jobs, validate_dataset


def jobs_of(root, model, config=None, rows=None):
    if rows is not None:
        write_jsonl(root, rows)
    report = validate_dataset(root, model=model)
    assert report.ok, report.render()
    return load_jobs(report.manifest, config or TrainConfig(steps=10), model)


def test_job_ids_are_stable_and_content_based(tmp_path, tiny_model):
    a = tmp_path / "a"
    good = add_good_files(a)
    single = {"image": good["image"], "sentence": "a <k|thing>"}
    (first, second) = jobs_of(a, tiny_model, rows=[good, single])
    again = jobs_of(a, tiny_model)
    assert [j.job_id for j in again] == [first.job_id, second.job_id]
    # same content elsewhere, under other file names: same ids
    b = tmp_path / "b"
    shutil.copytree(a, b)
    os.rename(b / "images" / "good.png", b / "images" / "renamed.png")
    moved = [{**good, "image": "images/renamed.png"}, {**single, "image": "images/renamed.png"}]
    assert [j.job_id for j in jobs_of(b, tiny_model, rows=moved)] == [first.job_id, second.job_id]
    # the id is mcpl.job.bundle.job_id over content + config + model
    assert first.job_id == job_id(first.image_hashes, first.sentences, first.config.job_hash(), model_hash(tiny_model))
    # a changed sentence, image or config changes the id; bookkeeping fields do not
    changed = jobs_of(a, tiny_model, rows=[good, {**single, "sentence": "a <k|object>"}])
    assert changed[0].job_id == first.job_id and changed[1].job_id != second.job_id
    assert jobs_of(a, tiny_model, TrainConfig(steps=11))[0].job_id != first.job_id
    assert jobs_of(a, tiny_model, TrainConfig(steps=10, checkpoint_every=5))[0].job_id == first.job_id
    # fields added later (cl_reorder, phrase_shuffle) leave ids of work done before them alone (the value that work
    # had hashes as if the field did not exist) and count once set otherwise, even as a new default (phrase_shuffle)
    earlier = TrainConfig(steps=10, phrase_shuffle=0.0)
    dumped = earlier.model_dump(exclude={"checkpoint_every", "keep_checkpoints", "cl_reorder", "phrase_shuffle"})
    assert earlier.job_hash() == hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]
    base = jobs_of(a, tiny_model, earlier)[0].job_id
    assert jobs_of(a, tiny_model, TrainConfig(steps=10, phrase_shuffle=0.0, cl_reorder=False))[0].job_id == base
    assert first.job_id != base and first.config.phrase_shuffle == 0.5
    assert jobs_of(a, tiny_model, TrainConfig(steps=10, phrase_shuffle=0.0, cl_reorder=True))[0].job_id != base
    scene().rotate(90).save(a / "images" / "good.png")
    assert jobs_of(a, tiny_model)[0].job_id != first.job_id


def test_jobspec_json_round_trip(tmp_path, tiny_model):
    good = add_good_files(tmp_path)
    add_good_files(tmp_path, "b")
    rows = [{**good, "group": "g", "overrides": {"seed": 3}},
            {"image": "images/b.png", "sentence": "a red <c1|object|red> and a <c9|thing>", "group": "g",
             "overrides": {"seed": 3}}]
    (spec,) = jobs_of(tmp_path, tiny_model, TrainConfig(steps=4), rows=rows)
    assert spec.config.strategy == "diverse" and spec.config.seed == 3 and spec.rows == [1, 2]
    assert spec.masks == [good["masks"], {}] and spec.group == "g"
    data = json.loads(json.dumps(spec.to_dict()))
    back = JobSpec.from_dict(data)
    assert back == spec and back.config.job_hash() == spec.config.job_hash()
    inputs = back.load_inputs()
    assert [i.source for i in inputs] == ["images/good.png", "images/b.png"]
    assert set(inputs[0].masks) == {"<c1>", "<c2>"} and inputs[1].masks == {}
    assert inputs[1].sentence.concepts[1].token == "<c9>"


def test_load_inputs_refuses_changed_or_escaped_files(tmp_path, tiny_model):
    root = tmp_path / "ds"
    good = add_good_files(root)
    (spec,) = jobs_of(root, tiny_model, rows=[good])
    scene(size=32).rotate(180).save(root / "images" / "good.png")
    with pytest.raises(StaleInputError, match="changed since validation"):
        spec.load_inputs()
    os.remove(root / "images" / "good.png")
    scene().save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "images" / "good.png")
    with pytest.raises(FileCheckError, match="outside the dataset folder"):
        spec.load_inputs()


def test_manifest_finds_a_moved_dataset(tmp_path, tiny_model):
    root = tmp_path / "repo" / "data" / "ds"
    write_jsonl(root, [add_good_files(root)])
    report = validate_dataset(root, tmp_path / "repo" / "out" / "manifest.parquet", model=tiny_model)
    shutil.move(tmp_path / "repo", tmp_path / "moved")
    (spec,) = load_jobs(tmp_path / "moved" / "out" / "manifest.parquet", TrainConfig(), tiny_model)
    assert spec.dataset == str((tmp_path / "moved" / "data" / "ds").resolve())
    assert report.manifest.name == "manifest.parquet" and spec.load_inputs()
