"""The paper's LDM-256 family: LDMBert carries the rows; its encoder is bidirectional, so no causal shortcut."""

from __future__ import annotations

import pytest
import torch
from helpers.images import two_square_image

from mcpl.config import RunOptions, TrainConfig
from mcpl.errors import SentenceError
from mcpl.job.run import run_job
from mcpl.method.inputs import JobInput
from mcpl.method.models import load_components
from mcpl.method.trainer import MCPLTrainer

TWO = "a photo of a red <c1|object|red> and a blue <c2|thing|blue>"


def trainer_for(model: str, config: TrainConfig, sentence: str = TWO) -> MCPLTrainer:
    return MCPLTrainer(load_components(model), [JobInput.from_text(two_square_image(), sentence)], config,
                       progress=False)


def test_rows_on_ldmberts_table_and_only_they_change(tiny_ldm):
    trainer = trainer_for(tiny_ldm, TrainConfig.full_mcpl(steps=3, batch_size=2))
    c = trainer.c
    assert c.family.name == "ldm" and c.default_resolution == 32 and not c.family.causal_text
    frozen = {k: v.clone() for k, v in c.text_encoder.state_dict().items()}
    start = trainer.embedding.rows.detach().clone()
    trainer.train()
    assert all(torch.equal(v, frozen[k]) for k, v in c.text_encoder.state_dict().items())
    assert not torch.equal(trainer.embedding.rows.detach(), start)


def test_prompt_cl_views_are_never_shortened_on_a_bidirectional_encoder(tiny_ldm):
    """The shortcut is used only where it is exact: on LDMBert a shorter view would change the features."""
    trainer = trainer_for(tiny_ldm, TrainConfig(prompt_cl=True))
    args = ([0, 0], ["{}", "a photo of {}"])
    full, short = trainer.encode_prompts(*args), trainer.encode_prompts(*args, full_length=False)
    assert short.ids[0].shape == full.ids[0].shape == (2, 77)  # the shortcut is off
    with torch.no_grad():
        f_full = torch.einsum("ncl,nld->ncd", full.concept_weights, trainer.encode_text(full).hidden)
        f_short = torch.einsum("ncl,nld->ncd", short.concept_weights, trainer.encode_text(short).hidden)
        assert torch.allclose(f_full, f_short)
        # ... and it would not be exact: cutting the padding changes LDMBert's features at the same positions
        cut = int(full.ids[0].ne(trainer.prompts.tokenizer.pad_token_id).sum(1).max())
        truncated = type(full)([full.ids[0][:, :cut]], full.concept_weights[..., :cut],
                               full.adjective_weights[..., :cut], full.images)
        f_cut = torch.einsum("ncl,nld->ncd", truncated.concept_weights, trainer.encode_text(truncated).hidden)
    assert not torch.allclose(f_full, f_cut, atol=1e-4)


def test_uppercase_placeholders_are_refused(tiny_ldm):
    with pytest.raises(SentenceError, match="lowercase"):
        trainer_for(tiny_ldm, TrainConfig(), "a <Dog|object>")


def test_a_job_trains_and_generates_through_mcpl_own_loader(tiny_ldm, tmp_path):
    from mcpl.concepts.generate import generate, load_concepts, load_pipeline

    result = run_job(tiny_ldm, [JobInput.from_text(two_square_image(), TWO)],
                     TrainConfig(steps=2, batch_size=2, map_timesteps=2), tmp_path,
                     options=RunOptions(samples=1, sample_steps=2, progress=False))
    assert result.record.family == "ldm" and (tmp_path / "samples" / "c1.png").exists()
    pipe = load_pipeline(tiny_ldm, "cpu")
    tokens = load_concepts(pipe, list(result.concept_files.values()))
    out = generate(pipe, "a photo of <c1> and <c2>", tokens, num_images=1, steps=2)
    assert out.images[0].size == (32, 32) and set(out.maps[0]) == {"<c1>", "<c2>"}


def test_a_vq_autoencoder_folder_trains_and_generates(tmp_path):
    """Latent-diffusion folders may name a VQModel as their "vqvae" (the pipeline accepts either)."""
    from mcpl.concepts.generate import generate, load_concepts, load_pipeline
    from mcpl.method.tiny import build_tiny_ldm

    model = str(build_tiny_ldm(tmp_path / "ldm-vq", vq=True))
    c = load_components(model)
    assert type(c.vae).__name__ == "VQModel"
    result = run_job(model, [JobInput.from_text(two_square_image(), TWO)],
                     TrainConfig(steps=2, batch_size=2, map_timesteps=2), tmp_path / "job",
                     options=RunOptions(samples=1, sample_steps=2, progress=False))
    pipe = load_pipeline(model, "cpu")
    tokens = load_concepts(pipe, list(result.concept_files.values()))
    assert generate(pipe, "a photo of <c1>", tokens, num_images=1, steps=2).images[0].size == (32, 32)


def test_an_unknown_autoencoder_class_is_refused(tiny_ldm, tmp_path):
    import json
    import shutil

    from mcpl.errors import ModelLoadError

    model = tmp_path / "odd"
    shutil.copytree(tiny_ldm, model)
    index = json.loads((model / "model_index.json").read_text())
    index["vqvae"] = ["diffusers", "AsymmetricAutoencoderKL"]
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="AsymmetricAutoencoderKL"):
        load_components(str(model))
