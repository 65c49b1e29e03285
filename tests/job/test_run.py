"""A job's run and its bundle: files diffusers loads, maps and overlays, metadata."""

from __future__ import annotations

import json

import torch
from diffusers import StableDiffusionPipeline
from helpers.images import two_square_image
from PIL import Image
from safetensors.torch import load_file

from mcpl.concepts.embeddings import load_concept
from mcpl.config import RunOptions, TrainConfig
from mcpl.job.run import run_job
from mcpl.method.inputs import JobInput

TWO = "a photo of a red <c1|object|red> and a blue <c2|thing|blue>"


def test_bundle_layout_and_metadata(bundle):
    out = bundle.out_dir
    record = json.loads((out / "job.json").read_text())
    assert [c["token"] for c in record["concepts"]] == ["<c1>", "<c2>"]
    token, vectors, meta = load_concept(out / record["concepts"][0]["file"])
    assert token == "<c1>" and vectors.dtype == torch.float32 and vectors.shape == (1, 32)
    for key in ("base_model", "base_model_hash", "sentences", "initializer", "adjective", "strategy", "seed",
                "steps", "image_hashes"):
        assert key in meta, key
    assert meta["adjective"] == "red" and json.loads(meta["steps"]) == 6
    maps = load_file(str(out / "attention" / "image_0.safetensors"))
    assert set(maps) == {"<c1>", "<c2>"} and maps["<c1>"].ndim == 2
    assert Image.open(out / "attention" / "image_0.png").size[0] == 160 * 3
    assert set(record["metrics"]["image_0"]) == {"<c1>", "<c2>"}
    assert 0 <= record["metrics"]["image_0"]["<c1>"]["iou"] <= 1
    for name in ("c1", "c2", "composed", "all"):
        assert (out / "samples" / f"{name}.png").exists()


def test_each_concept_has_its_own_overlay(bundle):
    """The registry shows a concept's picture: the image and that concept's map only (not the whole job's)."""
    for name in ("c1", "c2"):
        own = Image.open(bundle.out_dir / "concepts" / name / "overlay.png")
        assert own.size[0] == 160 * 2
    c1 = Image.open(bundle.out_dir / "concepts" / "c1" / "overlay.png").crop((160, 0, 320, 160))
    c2 = Image.open(bundle.out_dir / "concepts" / "c2" / "overlay.png").crop((160, 0, 320, 160))
    assert c1.tobytes() != c2.tobytes()


def test_learned_file_loads_in_diffusers_and_generates(bundle, tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    file = bundle.concept_files["<c1>"]
    pipe.load_textual_inversion(str(file))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<c1>")
    _, vectors, _ = load_concept(file)
    assert torch.allclose(pipe.text_encoder.get_input_embeddings().weight[token_id], vectors[0])
    image = pipe("a photo of <c1>", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3)


def test_mcpl_all_exports_concepts_and_keeps_word_tokens(tiny_model, tmp_path):
    inputs = [JobInput.from_text(two_square_image(), TWO)]
    result = run_job(tiny_model, inputs, TrainConfig(strategy="all", steps=2), tmp_path,
                     options=RunOptions(samples=0, progress=False))
    assert [c.token for c in result.record.concepts] == ["<c1>", "<c2>"]
    everything = load_file(str(tmp_path / "embeddings.safetensors"))
    assert len(everything) > 2 and "<w1.photo>" in everything


