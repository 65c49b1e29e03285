"""Job bundles: files diffusers loads, maps and overlays, the CLI, and a real kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import two_square_image
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from mcpl.concepts.embeddings import export_concept, load_concept
from mcpl.config import TrainConfig
from mcpl.job.run import run_job
from mcpl.method.trainer import JobInput

TWO = "a photo of a red <c1|object|red> and a blue <c2|thing|blue>"


def square_mask(box) -> Image.Image:
    m = Image.new("L", (32, 32), 0)
    m.paste(255, box)
    return m


@pytest.fixture(scope="module")
def bundle(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("job")
    masks = {"<c1>": square_mask((2, 2, 14, 14)), "<c2>": square_mask((18, 18, 30, 30))}
    inputs = [JobInput.from_text(two_square_image(), TWO, source="two.png", masks=masks)]
    result = run_job(tiny_model, inputs, TrainConfig.full_mcpl(steps=6, checkpoint_every=3), out,
                     samples=1, sample_steps=2, progress=False)
    return result


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


def test_export_formats(bundle, tmp_path):
    src = bundle.concept_files["<c2>"]
    diffusers_file = export_concept(src, tmp_path / "d")
    assert load_file(str(diffusers_file)).keys() == {"<c2>"}
    a1111 = export_concept(src, tmp_path / "a", fmt="a1111", name="my-c2")
    assert a1111.name == "my-c2.safetensors" and load_file(str(a1111)).keys() == {"emb_params"}
    with pytest.raises(ValueError, match="unknown export format"):
        export_concept(src, tmp_path, fmt="ckpt")


def test_mcpl_all_exports_concepts_and_keeps_word_tokens(tiny_model, tmp_path):
    inputs = [JobInput.from_text(two_square_image(), TWO)]
    result = run_job(tiny_model, inputs, TrainConfig(strategy="all", steps=2), tmp_path, samples=0, progress=False)
    assert [c["token"] for c in result.record["concepts"]] == ["<c1>", "<c2>"]
    everything = load_file(str(tmp_path / "embeddings.safetensors"))
    assert len(everything) > 2 and "<w1.photo>" in everything


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mcpl", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_cli_kill_and_rerun_equals_uninterrupted(tiny_model, tmp_path):
    """SIGKILL mid-training, rerun the same command: same embeddings as a run never stopped."""
    image = tmp_path / "two.png"
    two_square_image().save(image)
    common = ["train", "--model", tiny_model, "--image", str(image), "--sentence", TWO, "--full",
              "--steps", "120", "--set", "checkpoint_every=20", "--samples", "0", "--threads", "1"]
    straight = cli(*common, "--out", str(tmp_path / "a"), cwd=tmp_path)
    killed = cli(*common, "--out", str(tmp_path / "b"), cwd=tmp_path)
    deadline = time.time() + 120
    while not list((tmp_path / "b" / "checkpoints").glob("step_00000040")) and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "b" / "job.json").exists(), "the run should have been killed before finishing"
    rerun = cli(*common, "--out", str(tmp_path / "b"), cwd=tmp_path)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert straight.wait(timeout=300) == 0
    a = load_file(str(tmp_path / "a" / "embeddings.safetensors"))
    b = load_file(str(tmp_path / "b" / "embeddings.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((tmp_path / "b" / "job.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 121))


def test_cli_generate_writes_images_and_overlays(bundle, tmp_path):
    proc = cli("generate", "a <c1> and a <c2>", "--concepts", str(bundle.out_dir), "--num", "2",
               "--steps", "2", "--out", str(tmp_path / "gen"), cwd=tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert (tmp_path / "gen" / "image_1.png").exists() and (tmp_path / "gen" / "attention_1.png").exists()


def test_cli_reports_bad_sentence_clearly(tmp_path, tiny_model):
    two_square_image().save(tmp_path / "x.png")
    proc = cli("train", "--model", tiny_model, "--image", str(tmp_path / "x.png"), "--sentence", "a red square",
               cwd=tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "error: no placeholder" in out
