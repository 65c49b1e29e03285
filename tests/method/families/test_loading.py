"""Which family a folder is, what happens with folders mcpl cannot train, and pickled weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.images import two_square_image

from mcpl.config import TrainConfig
from mcpl.errors import ModelLoadError, RegistryError
from mcpl.method.families import family_of
from mcpl.method.inputs import JobInput
from mcpl.method.models import load_components
from mcpl.method.trainer import MCPLTrainer


def test_each_folder_gets_its_family(tiny_model, tiny_sdxl, tiny_ldm, tiny_sd2v):
    assert [family_of(m).name for m in (tiny_model, tiny_sdxl, tiny_ldm, tiny_sd2v)] == ["sd", "sdxl", "ldm", "sd"]


def test_an_unsupported_pipeline_is_a_clear_error(tiny_model, tmp_path):
    other = tmp_path / "kandinsky"
    shutil.copytree(tiny_model, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(ModelLoadError, match="KandinskyPipeline model; mcpl trains"):
        load_components(str(other))


def test_incomplete_sdxl_folder_names_what_is_missing(tiny_sdxl, tmp_path):
    broken = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelLoadError, match="missing text_encoder_2"):
        load_components(str(broken))


def test_pickled_only_weights_are_refused_unless_opted_in(tiny_model, tmp_path, monkeypatch):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    weights = next((pickled / "unet").glob("*.safetensors"))
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), pickled / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="only pickled weights"):
        load_components(str(pickled))
    monkeypatch.setenv("MCPL_ALLOW_PICKLE_WEIGHTS", "1")
    assert load_components(str(pickled)).family.name == "sd"


def test_v_prediction_models_train_on_the_velocity(tiny_sd2v):
    trainer = MCPLTrainer(load_components(tiny_sd2v), [JobInput.from_text(two_square_image(), "a <c1|object>")],
                          TrainConfig(steps=2, batch_size=2), progress=False)
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert torch.equal(trainer._target(latents, noise, t), trainer.c.scheduler.get_velocity(latents, noise, t))
    trainer.train()
    assert len(trainer.history) == 2


def test_a_concept_does_not_load_into_another_family_or_width(tiny_model, tiny_sdxl, tiny_ldm, tmp_path):
    from mcpl.concepts.generate import load_concepts, load_pipeline
    from mcpl.config import RunOptions
    from mcpl.job.run import run_job

    job = run_job(tiny_model, [JobInput.from_text(two_square_image(), "a <c1|object>")], TrainConfig(steps=1),
                  tmp_path, options=RunOptions(samples=0, progress=False))
    file = job.concept_files["<c1>"]
    for other in (tiny_sdxl, tiny_ldm):
        with pytest.raises(RegistryError, match="learned on a sd model"):
            load_concepts(load_pipeline(other, "cpu"), [file])
    wide = tmp_path / "wide"
    from mcpl.method.tiny import build_tiny_model

    build_tiny_model(wide, cross_attention_dim=48)
    with pytest.raises(RegistryError, match="widths"):
        load_concepts(load_pipeline(str(wide), "cpu"), [file])
    same = tmp_path / "same-family"
    build_tiny_model(same, seed=3)
    with pytest.warns(UserWarning, match="learned on another sd model"):
        load_concepts(load_pipeline(str(same), "cpu"), [file])
