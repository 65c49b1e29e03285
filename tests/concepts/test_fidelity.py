"""The fidelity metric: tiny random-weight DINOv2, DINO (ViT) and CLIP folders built here, saved with
save_pretrained and loaded back through the path users take (mcpl.concepts.fidelity.load_feature_model);
then the metric in job.json, MLflow job metrics, registry card tags and `mcpl evaluate`."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from helpers.data import add_good_files, write_jsonl
from helpers.images import two_square_image
from PIL import Image

from mcpl.concepts import fidelity
from mcpl.config import RunOptions, TrainConfig
from mcpl.errors import ConfigError, ModelLoadError
from mcpl.method.inputs import JobInput

TWO = "a photo of a red <c1|object|red> and a blue <c2|thing|blue>"
QUICK = TrainConfig(steps=2, batch_size=2, map_timesteps=2, checkpoint_every=1)


def _quiet_processor(name: str):
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def build_dinov2(out) -> str:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=8, image_size=32)).save_pretrained(out)
    _quiet_processor("BitImageProcessor")(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                          image_mean=list(fidelity.IMAGENET_MEAN),
                                          image_std=list(fidelity.IMAGENET_STD)).save_pretrained(out)
    return str(out)


def build_dino_vit(out) -> str:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       patch_size=8, image_size=32), add_pooling_layer=False).save_pretrained(out)
    _quiet_processor("ViTImageProcessor")(size={"height": 32, "width": 32}).save_pretrained(out)
    return str(out)


def build_clip(out) -> str:
    from transformers import CLIPConfig, CLIPModel

    from mcpl.method.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(out)
    torch.manual_seed(2)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, bos_token_id=0,
                eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out)
    _quiet_processor("CLIPImageProcessor")(size={"shortest_edge": 32},
                                           crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory) -> str:
    return build_dinov2(tmp_path_factory.mktemp("features") / "dinov2")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return build_clip(tmp_path_factory.mktemp("features") / "clip")


def square_mask(box, size: int = 32) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    m.paste(255, box)
    return m


def as_bool(mask: Image.Image) -> torch.Tensor:
    return fidelity.binary_mask(mask, (mask.height, mask.width))


# ------------------------------------------------------------------------- the metric itself
def test_folders_load_back_with_their_preprocessing(dinov2, clip, tmp_path):
    d = fidelity.load_feature_model(dinov2)
    assert (d.kind, d.key, d.size, d.has_text) == ("dinov2", "fidelity_dinov2", 32, False)
    assert d.fill == tuple(round(m * 255) for m in fidelity.IMAGENET_MEAN)
    c = fidelity.load_feature_model(clip)
    assert (c.kind, c.key, c.has_text) == ("clip", "fidelity_clip", True)
    assert c.mean == pytest.approx(fidelity.CLIP_MEAN)
    v = fidelity.load_feature_model(build_dino_vit(tmp_path / "dino"))
    assert (v.kind, v.key) == ("vit", "fidelity_vit")
    feats = v.image_features([two_square_image(), two_square_image(((0, 255, 0), (0, 0, 0)))])
    assert feats.shape == (2, 32) and torch.allclose(feats.norm(dim=-1), torch.ones(2))
    assert fidelity.load_feature_model(dinov2) is d  # once per process
    # the pixels the model sees: the fill colour is exactly zero after normalisation
    grey = d.pixels([Image.new("RGB", (20, 20), d.fill)])
    assert grey.shape == (1, 3, 32, 32) and grey.abs().max() < 0.02


def test_bad_folders_are_user_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not a local transformers folder"):
        fidelity.load_feature_model(tmp_path / "nowhere")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="'bert' model; use one of"):
        fidelity.load_feature_model(tmp_path / "bert")


def test_masked_object_keeps_the_object_only():
    image = two_square_image()
    obj = fidelity.masked_object(image, as_bool(square_mask((2, 2, 14, 10))), (1, 2, 3))
    assert obj.size == (12, 12)  # the 12 x 8 box, padded to a square
    assert obj.getpixel((6, 6)) == (255, 0, 0) and obj.getpixel((0, 0)) == (1, 2, 3)
    assert fidelity.masked_object(image, torch.zeros(32, 32, dtype=torch.bool), (0, 0, 0)) is None


def test_identical_object_scores_one_and_other_images_less(dinov2, clip):
    models = fidelity.load_models([dinov2, clip])
    image = two_square_image()
    mask = square_mask((2, 2, 14, 14))
    attention = as_bool(mask).float()  # the concept "attends" exactly to its object
    same = fidelity.ConceptSamples("<c1>", image, as_bool(mask), [image, image], [attention, attention],
                                   "a photo of a red object")
    scores = fidelity.concept_fidelity(models, same)
    assert set(scores) == {"fidelity_dinov2", "fidelity_clip", "clip_t"}
    assert scores["fidelity_dinov2"] == pytest.approx(1.0, abs=1e-5)
    assert scores["fidelity_clip"] == pytest.approx(1.0, abs=1e-5)
    assert -1 <= scores["clip_t"] <= 1

    # the same object on another background, masked by its attention there: the background does not count
    elsewhere = Image.new("RGB", (32, 32), (0, 200, 0))
    elsewhere.paste((255, 0, 0), (2, 2, 14, 14))
    moved = fidelity.ConceptSamples("<c1>", image, as_bool(mask), [elsewhere], [attention])
    assert fidelity.concept_fidelity(models, moved)["fidelity_dinov2"] == pytest.approx(1.0, abs=1e-5)
    # ... but it does when the generation is taken whole (no attention to mask it with)
    whole = fidelity.ConceptSamples("<c1>", image, as_bool(mask), [elsewhere], [None])
    assert fidelity.concept_fidelity(models, whole)["fidelity_dinov2"] < 0.999

    noise = Image.fromarray(torch.randint(0, 255, (32, 32, 3), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy())
    other = fidelity.ConceptSamples("<c1>", image, as_bool(mask), [noise, noise], [None, None])
    low = fidelity.concept_fidelity(models, other)
    assert low["fidelity_dinov2"] < scores["fidelity_dinov2"] - 1e-3
    assert low["fidelity_clip"] < scores["fidelity_clip"] - 1e-3
    empty = fidelity.ConceptSamples("<c1>", image, torch.zeros(32, 32, dtype=torch.bool), [image], [None])
    assert fidelity.concept_fidelity(models, empty) == {}


def test_concept_words():
    assert fidelity.concept_words("a photo of a <c1>", "<c1>", "dog", "brown") == "a photo of a brown dog"
    assert fidelity.concept_words("a photo of a <c1>", "<c1>", "", None) == "a photo of a object"


# ------------------------------------------------------------------------- in a job, MLflow, registry
@pytest.fixture(scope="module")
def scored_job(tiny_model, dinov2, clip, tmp_path_factory):
    from mcpl.job.run import run_job

    masks = {"<c1>": square_mask((2, 2, 14, 14))}  # <c2> has no mask: its own attention cuts its object
    inputs = [JobInput.from_text(two_square_image(), TWO, source="two.png", masks=masks)]
    options = RunOptions(samples=2, sample_steps=2, progress=False, fidelity_model=dinov2, clip_model=clip)
    return run_job(tiny_model, inputs, QUICK, tmp_path_factory.mktemp("job"), options=options)


def test_job_record_holds_fidelity_beside_the_attention_metrics(scored_job):
    record = json.loads((scored_job.out_dir / "job.json").read_text())
    c1, c2 = record["metrics"]["image_0"]["<c1>"], record["metrics"]["image_0"]["<c2>"]
    assert {"iou", "iou_other", "share", "fidelity_dinov2", "fidelity_clip", "clip_t"} <= set(c1)
    assert "iou" not in c2 and {"fidelity_dinov2", "fidelity_clip", "clip_t"} <= set(c2)
    for values in (c1, c2):
        assert all(-1 <= values[k] <= 1 for k in ("fidelity_dinov2", "fidelity_clip", "clip_t"))
    sample = record["samples"]["c1"]
    assert sample["images"] == ["samples/c1/0.png", "samples/c1/1.png"]
    assert sample["maps"] == "samples/c1/maps.safetensors"
    assert all((scored_job.out_dir / rel).is_file() for rel in sample["images"])


def test_fidelity_reaches_registry_card_tags(scored_job):
    from mcpl.job.cards import concept_cards

    record = scored_job.bundle.record()
    cards = {c.token: c for c in concept_cards(scored_job.bundle)}
    tags = cards["<c2>"].tags()
    assert float(tags["metric.image_0.fidelity_dinov2"]) == pytest.approx(
        record.metrics["image_0"]["<c2>"]["fidelity_dinov2"], abs=1e-5)
    assert "metric.image_0.clip_t" in tags and "metric.image_0.iou" in cards["<c1>"].tags()


def test_fidelity_needs_samples_and_a_real_folder_before_training(tiny_model, tmp_path, dinov2):
    from mcpl.job.run import run_job

    inputs = [JobInput.from_text(two_square_image(), TWO)]
    with pytest.raises(ConfigError, match="samples >= 1"):
        run_job(tiny_model, inputs, QUICK, tmp_path / "a", options=RunOptions(samples=0, fidelity_model=dinov2))
    with pytest.raises(ModelLoadError, match="not a local transformers folder"):
        run_job(tiny_model, inputs, QUICK, tmp_path / "b",
                options=RunOptions(samples=1, fidelity_model=str(tmp_path / "missing")))
    assert not (tmp_path / "a" / "job.json").exists() and not (tmp_path / "b" / "job.json").exists()


# ------------------------------------------------------------------------- mcpl evaluate
@pytest.fixture(scope="module")
def batch(tiny_model, tmp_path_factory):
    """A batch of one job with masks, trained without a feature model (samples kept)."""
    from mcpl.pipeline.data import load_jobs, validate_dataset
    from mcpl.pipeline.workers import run_batch

    root = tmp_path_factory.mktemp("fds") / "ds"
    write_jsonl(root, [add_good_files(root)])
    report = validate_dataset(root, root.parent / "manifest.parquet", model=tiny_model)
    jobs = load_jobs(report.manifest, QUICK, tiny_model)
    out = root.parent / "batch"
    summary = run_batch(jobs, out, RunOptions(samples=2, sample_steps=2, progress=False))
    assert summary.ok
    return root, out


def test_evaluate_computes_fidelity_after_the_fact(batch, dinov2, clip, tmp_path, capsys):
    from mcpl.cli import main

    root, out = batch
    plain = tmp_path / "plain"
    assert main(["evaluate", "--batch", str(out), "--out", str(plain)]) == 0
    assert "fidelity" not in json.loads((plain / "metrics.json").read_text())  # nothing computed, nothing shown

    scored = tmp_path / "scored"
    assert main(["evaluate", "--batch", str(out), "--out", str(scored), "--fidelity-model", dinov2,
                 "--clip-model", clip]) == 0
    metrics = json.loads((scored / "metrics.json").read_text())
    f = metrics["fidelity"]
    assert f["concepts"] == 2 and f["ground_truth_masks"] == 2 and f["jobs_unscored"] == 0
    assert all(-1 <= f[k] <= 1 for k in ("fidelity_dinov2", "fidelity_clip", "clip_t"))
    assert metrics["attention"]["concepts"] == 2 and metrics["attention"]["iou"] is not None
    rows = list(csv.DictReader(open(scored / "concepts.csv")))
    assert {"iou", "fidelity_dinov2", "fidelity_clip", "clip_t"} <= set(rows[0]) and len(rows) == 2
    # the bundles are read, never changed (they are the train stage's DVC outputs)
    job_json = next(out.glob("jobs/*/job.json"))
    assert "fidelity_dinov2" not in job_json.read_text()

    # training images gone: said plainly, and nothing can be scored -> a user error (exit 2)
    shutil.move(root / "images", root.parent / "moved")
    try:
        capsys.readouterr()
        assert main(["evaluate", "--batch", str(out), "--out", str(tmp_path / "gone"), "--fidelity-model",
                     dinov2]) == 2
        err = capsys.readouterr().err
        assert "no job of the batch could be scored" in err and "not reachable" in err
    finally:
        shutil.move(root.parent / "moved", root / "images")


def test_tracked_batch_logs_fidelity_and_evaluate_reports_it(tiny_model, dinov2, tmp_path):
    """A batch trained with a feature model: the job's MLflow run has the metric; evaluate reports job.json's
    values with no feature model of its own."""
    from mlflow import MlflowClient

    from mcpl.pipeline.data import load_jobs, validate_dataset
    from mcpl.pipeline.report import evaluate_batch
    from mcpl.pipeline.tracking.observer import MlflowObserver
    from mcpl.pipeline.workers import run_batch

    root = tmp_path / "ds"
    write_jsonl(root, [{"image": add_good_files(root)["image"], "sentence": "a red <c1|object|red> on white"}])
    report = validate_dataset(root, tmp_path / "manifest.parquet", model=tiny_model)
    jobs = load_jobs(report.manifest, QUICK, tiny_model)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    observer = MlflowObserver.for_batch(tmp_path / "batch", uri, "fidelity-test", "batch-fidelity")
    options = RunOptions(samples=1, sample_steps=2, progress=False, fidelity_model=dinov2)
    summary = run_batch(jobs, tmp_path / "batch", options, [observer])
    assert summary.ok and summary.tracking["pending"] == 0
    record = json.loads(next((tmp_path / "batch").glob("jobs/*/job.json")).read_text())
    value = record["metrics"]["image_0"]["<c1>"]["fidelity_dinov2"]

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`mcpl.kind` = 'job'")
    assert len(runs) == 1 and runs[0].data.metrics["eval.image_0.c1.fidelity_dinov2"] == pytest.approx(value)

    metrics = evaluate_batch(tmp_path / "batch", tmp_path / "eval")
    assert metrics["fidelity"] == {"concepts": 1, "fidelity_dinov2": round(value, 4), "ground_truth_masks": 0}
    assert metrics["attention"]["concepts"] == 0  # no mask: no IoU, but a fidelity from its own attention
    rows = list(csv.DictReader(open(tmp_path / "eval" / "concepts.csv")))
    assert rows[0]["iou"] == "" and float(rows[0]["fidelity_dinov2"]) == pytest.approx(value, abs=1e-4)
