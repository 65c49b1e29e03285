"""The concept registry on an embedded SQLite MLflow: names, versions, dedup, snapshot, load, export, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.servers import jobs_for, write_dataset
from safetensors import safe_open

pytest_plugins = ("helpers.server_fixtures",)

SENTENCE = "a photo of a <dog|dog> on a <board|board>"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_model):
    """Two images that both learned <dog> and <board> (dataset `pets`), trained without tracking."""
    from mcpl.config import RunOptions
    from mcpl.pipeline.runner import run_one

    tmp = tmp_path_factory.mktemp("reg")
    root = write_dataset(tmp / "pets", [
        {"image": "a.png", "colours": ("red", "blue"), "sentence": SENTENCE},
        {"image": "b.png", "colours": ("green", "yellow"), "sentence": SENTENCE}])
    jobs = jobs_for(root, tiny_model)
    for job in jobs:
        run_one(job, tmp / "out", RunOptions(samples=1, sample_steps=2, progress=False))
    return {"out": tmp / "out", "jobs": jobs, "root": root, "tmp": tmp, "model": tiny_model}


@pytest.fixture(scope="module")
def published(bundles):
    from mcpl.pipeline.registry.publish import publish_bundles
    from mcpl.pipeline.tracking.store import client_for

    uri = f"sqlite:///{bundles['tmp'] / 'mlflow.db'}"
    report = publish_bundles(bundles["out"], uri)
    return {**bundles, "uri": uri, "report": report, "client": client_for(uri)}


def test_names_are_unique_and_readable(published):
    names = sorted(n for n, _ in published["report"].created)
    assert names == ["pets.images-a.board", "pets.images-a.dog", "pets.images-b.board", "pets.images-b.dog"]
    client = published["client"]
    version = client.get_model_version("pets.images-a.dog", "1")
    assert version.tags["token"] == "<dog>" and version.tags["source_image"] == "images/a.png"
    assert version.tags["sentence"] == SENTENCE and version.tags["strategy"] == "one"
    assert len(version.tags["sha256"]) == 64 and "metric.final_loss" in version.tags
    assert version.run_id and version.source.endswith("/concepts/dog")
    model = client.get_registered_model("pets.images-a.dog")
    assert model.tags["concept"] == "dog" and model.aliases == {"one": 1}
    found = client.search_registered_models("tags.concept = 'dog'")
    assert {m.name for m in found} == {"pets.images-a.dog", "pets.images-b.dog"}


def test_republishing_adds_no_versions(published):
    from mcpl.pipeline.registry.publish import publish_bundles
    from mcpl.pipeline.registry.refs import SNAPSHOT_MODEL

    before = published["report"].snapshot_version
    again = publish_bundles(published["out"], published["uri"])
    assert again.created == [] and len(again.unchanged) == 4
    assert again.snapshot_version == before and not again.snapshot_changed
    assert len(published["client"].search_model_versions(f"name = '{SNAPSHOT_MODEL}'")) == 1


def test_snapshot_holds_every_version_with_vectors(published):
    from mcpl.concepts.embeddings import load_concept
    from mcpl.pipeline.registry.refs import SNAPSHOT_MODEL, download_version, resolve
    from mcpl.pipeline.registry.snapshot import SNAPSHOT_FILE, read_snapshot

    client = published["client"]
    name, version = resolve(client, f"models:/{SNAPSHOT_MODEL}@latest")
    rows = read_snapshot(download_version(client, name, version) / SNAPSHOT_FILE)
    assert sorted(r["name"] for r in rows) == sorted(n for n, _ in published["report"].created)
    row = next(r for r in rows if r["name"] == "pets.images-b.board")
    job = next(j for j in published["jobs"] if j.images == ["images/b.png"])
    _, vectors, _ = load_concept(published["out"] / "jobs" / job.job_id / "concepts/board/learned_embeds.safetensors")
    assert row["token"] == "<board>" and row["dim"] == vectors.shape[1] and row["num_vectors"] == 1
    assert torch.allclose(torch.tensor(row["vector"]), vectors.flatten())


def test_new_training_is_a_new_version(published):
    """Same image, another config: a new version of the same concepts, aliases and snapshot move."""
    from helpers.servers import jobs_for as jobs

    from mcpl.config import RunOptions
    from mcpl.pipeline.registry.publish import publish_bundles
    from mcpl.pipeline.registry.refs import SNAPSHOT_MODEL, resolve
    from mcpl.pipeline.runner import run_one

    job = [j for j in jobs(published["root"], published["model"], published["tmp"] / "m2.parquet", steps=6)
           if j.images == ["images/a.png"]][0]
    run_one(job, published["tmp"] / "out2", RunOptions(samples=0, progress=False))
    report = publish_bundles(published["tmp"] / "out2", published["uri"])
    assert sorted(report.created) == [("pets.images-a.board", "2"), ("pets.images-a.dog", "2")]
    client = published["client"]
    assert resolve(client, "pets.images-a.dog@latest") == ("pets.images-a.dog", "2")
    assert client.get_registered_model("pets.images-a.dog").aliases == {"one": 2}
    assert resolve(client, "pets.images-a.dog/1") == ("pets.images-a.dog", "1")
    assert report.snapshot_changed and len(client.search_model_versions(f"name = '{SNAPSHOT_MODEL}'")) == 2


def test_two_dogs_load_into_one_pipeline_with_their_own_tokens(published):
    from mcpl.concepts.embeddings import load_concept
    from mcpl.concepts.generate import generate, load_concepts, load_pipeline
    from mcpl.pipeline.registry.refs import load_into_pipeline

    pipe = load_pipeline(published["model"], "cpu")
    loaded = load_into_pipeline(pipe, ["pets.images-a.dog/1", "models:/pets.images-b.dog@latest",
                                       "pets.images-b.board"], uri=published["uri"])
    tokens = [i.token for i in loaded]
    assert tokens == ["<pets.images-a.dog>", "<pets.images-b.dog>", "<board>"]
    table = pipe.text_encoder.get_input_embeddings().weight
    for item in loaded:
        _, vectors, _ = load_concept(item.folder / "learned_embeds.safetensors")
        assert torch.allclose(table[pipe.tokenizer.convert_tokens_to_ids(item.token)], vectors[0])
    result = generate(pipe, "a <pets.images-a.dog> and a <pets.images-b.dog> on a <board>", tokens,
                      num_images=1, steps=2)
    assert len(result.images) == 1 and set(result.maps[0]) == set(tokens)
    with pytest.raises(ValueError, match="already loaded"):  # never a silent overwrite
        load_concepts(pipe, [loaded[0].folder / "learned_embeds.safetensors"], ["<board>"])


def test_name_collision_between_different_images_gets_a_suffix(published):
    from mcpl.job.cards import concept_cards
    from mcpl.pipeline.registry.publish import publish

    job = next(j for j in published["jobs"] if j.images == ["images/b.png"])
    card = next(c for c in concept_cards(published["out"] / "jobs" / job.job_id) if c.concept == "dog")
    card.name = "pets.images-a.dog"  # as if another image were named like a.png
    report = publish([card], published["uri"], snapshot=False)
    assert report.unchanged == [] and report.created == [(f"pets.images-a-{card.source_key[:6]}.dog", "1")]


def test_export_formats(published, tmp_path):
    from mcpl.concepts.generate import load_pipeline
    from mcpl.pipeline.registry.refs import export

    path = export("pets.images-a.dog@one", tmp_path / "d", "diffusers", uri=published["uri"])
    assert path.name == "pets.images-a.dog.safetensors"
    pipe = load_pipeline(published["model"], "cpu")
    pipe.load_textual_inversion(str(path))
    assert "<dog>" in pipe.tokenizer.get_vocab()
    for fmt in ("a1111", "comfyui"):
        file = export("pets.images-a.dog", tmp_path / fmt, fmt, file_name="petdog", uri=published["uri"])
        assert file.name == "petdog.safetensors"
        with safe_open(str(file), "pt") as fh:
            assert list(fh.keys()) == ["emb_params"] and fh.get_tensor("emb_params").ndim == 2


def test_list_reads_a_sqlite_store_directly_with_the_same_rows(published, monkeypatch):
    """`registry list` on ./mlflow.db answers without importing MLflow, with MLflow's own answer."""
    from mcpl.pipeline.registry import refs
    from mcpl.pipeline.tracking.store import client_for

    uri = published["uri"]
    assert uri.startswith("sqlite:")
    through_mlflow = refs.list_concepts(uri, client=client_for(uri, read_only=True))
    monkeypatch.setattr(refs, "client_for", lambda *a, **k: (_ for _ in ()).throw(AssertionError("MLflow used")))
    direct = refs.list_concepts(uri)
    assert direct == through_mlflow and {r["name"] for r in direct} >= {"pets.images-a.dog", "pets.images-b.dog"}


def test_cli_list_show_export(published, tmp_path, capsys):
    from mcpl.cli import main

    uri = published["uri"]
    assert main(["registry", "--tracking-uri", uri, "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"pets.images-a.dog", "pets.images-b.dog"}
    assert main(["registry", "--tracking-uri", uri, "list", "--filter", "tags.concept = 'board'"]) == 0
    out = capsys.readouterr().out
    assert "pets.images-a.board" in out and "pets.images-a.dog" not in out
    assert main(["registry", "--tracking-uri", uri, "show", "pets.images-b.dog"]) == 0
    assert "<dog>" in capsys.readouterr().out
    assert main(["registry", "--tracking-uri", uri, "export", "pets.images-b.dog", "--format", "comfyui",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "pets.images-b.dog.safetensors").exists()
    assert main(["registry", "--tracking-uri", uri, "show", "no.such.concept"]) == 2


def test_a_batch_folder_publishes_only_the_jobs_of_its_latest_run(tmp_path):
    from mcpl.job.bundle import find_bundles

    def find_job_dirs(root):
        return [b.path for b in find_bundles(root)]

    for job in ("old", "new", "failed"):
        (tmp_path / "jobs" / job).mkdir(parents=True)
        (tmp_path / "jobs" / job / "job.json").write_text("{}")
    assert [d.name for d in find_job_dirs(tmp_path)] == ["failed", "new", "old"]  # no summary: every bundle
    (tmp_path / "summary.json").write_text(json.dumps({"jobs": [
        {"job_id": "new", "status": "done", "out_dir": "jobs/new"},
        {"job_id": "failed", "status": "failed", "out_dir": "jobs/failed"}]}))
    assert [d.name for d in find_job_dirs(tmp_path)] == ["new"]
    assert find_job_dirs(tmp_path / "jobs" / "old") == [tmp_path / "jobs" / "old"]
