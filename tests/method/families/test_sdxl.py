"""SDXL as a family adapter: two encoders carry rows, conditioning as diffusers builds it, files tools read."""

from __future__ import annotations

import pytest
import torch
from helpers.images import two_square_image
from PIL import Image
from safetensors.torch import load_file

from mcpl.config import RunOptions, TrainConfig
from mcpl.job.run import run_job
from mcpl.method.inputs import JobInput
from mcpl.method.models import load_components
from mcpl.method.trainer import MCPLTrainer

TWO = "a photo of a red <c1|object|red> and a blue <c2|thing|blue>"


def trainer_for(model: str, config: TrainConfig, images=None, sentences=(TWO,), checkpoint_dir=None) -> MCPLTrainer:
    images = images or [two_square_image()] * len(sentences)
    inputs = [JobInput.from_text(i, s) for i, s in zip(images, sentences, strict=True)]
    return MCPLTrainer(load_components(model), inputs, config, checkpoint_dir, progress=False)


def test_every_new_token_gets_a_row_in_both_encoders_from_its_own_table(tiny_sdxl):
    trainer = trainer_for(tiny_sdxl, TrainConfig(num_vectors=2))
    assert trainer.c.family.name == "sdxl" and [e.rows.shape for e in trainer.embeddings] == [(4, 32), (4, 64)]
    for stack, embedding in zip(trainer.prompts.stacks, trainer.embeddings, strict=True):
        table = stack.encoder.get_input_embeddings().weight
        for row, word in zip(embedding.rows, ["object", "object", "thing", "thing"], strict=True):
            ids = stack.tokenizer(word, add_special_tokens=False).input_ids
            assert torch.allclose(row, table[ids].float().mean(0))


def test_only_the_new_rows_change_in_both_encoders(tiny_sdxl):
    trainer = trainer_for(tiny_sdxl, TrainConfig.full_mcpl(steps=3, batch_size=2))
    c = trainer.c
    frozen = {f"{n}.{k}": v.clone() for n, m in (("unet", c.unet), ("vae", c.vae), ("te1", c.stacks[0].encoder),
                                                  ("te2", c.stacks[1].encoder)) for k, v in m.state_dict().items()}
    start = [e.rows.detach().clone() for e in trainer.embeddings]
    trainer.train()
    after = {f"{n}.{k}": v for n, m in (("unet", c.unet), ("vae", c.vae), ("te1", c.stacks[0].encoder),
                                         ("te2", c.stacks[1].encoder)) for k, v in m.state_dict().items()}
    assert after.keys() == frozen.keys() and all(torch.equal(after[k], frozen[k]) for k in frozen)
    assert all(not torch.equal(e.rows.detach(), s) for e, s in zip(trainer.embeddings, start, strict=True))


def test_conditioning_is_what_the_diffusers_pipeline_builds(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    trainer = trainer_for(tiny_sdxl, TrainConfig(), images=[Image.new("RGB", (48, 32), "white")],
                          sentences=("a red <c1|object>",))
    text = trainer.encode_prompts([0], ["{}"])
    cond = trainer.encode_text(text)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    with torch.no_grad():  # the same prompt with the initializer word: the new row starts equal to it
        embeds, _, pooled, _ = pipe.encode_prompt("a red object", do_classifier_free_guidance=False)
    assert torch.allclose(cond.hidden, embeds, atol=1e-5) and torch.allclose(cond.added["text_embeds"], pooled,
                                                                             atol=1e-5)
    # time ids from the real image size: 48x32 resized to 24x16 then centre-cropped to 16x16
    assert cond.added["time_ids"].tolist() == [[32.0, 48.0, 0.0, 4.0, 16.0, 16.0]]


def test_masks_of_a_batch_of_two_equal_each_alone(tiny_sdxl):
    from mcpl.method.attention import union_mask

    images = [two_square_image(), two_square_image(((0, 200, 0), (250, 250, 0)))]
    sentences = [TWO, "a <c2|thing|blue> blue and <c1|object|red> red"]
    trainer = trainer_for(tiny_sdxl, TrainConfig(strategy="diverse", attention_layers=["attn2"]), images, sentences)
    g = torch.Generator().manual_seed(0)
    latents = trainer.latents.sample(torch.tensor([0, 1]), torch.tensor([False, True]),
                                     torch.randn(2, 4, 8, 8, generator=g))
    t = torch.tensor([300, 700])
    noisy = trainer.c.scheduler.add_noise(latents, torch.randn(2, 4, 8, 8, generator=g), t)
    text = trainer.encode_prompts([0, 1], ["{}", "a photo of {}"])
    with torch.no_grad():
        cond = trainer.encode_text(text)
        _, both = trainer.predict_with_maps(noisy, t, cond, text.concept_weights)
        alone = [trainer.predict_with_maps(noisy[i:i + 1], t[i:i + 1], cond.select(slice(i, i + 1)),
                                           text.concept_weights[i:i + 1])[1] for i in range(2)]
    for i in range(2):
        assert torch.allclose(both[i], alone[i][0], atol=1e-5)
        assert torch.equal(union_mask(both[i:i + 1], 0.5, (8, 8)), union_mask(alone[i], 0.5, (8, 8)))


def test_resume_is_bit_identical(tiny_sdxl, tmp_path):
    config = TrainConfig.full_mcpl(steps=4, batch_size=2, checkpoint_every=2)
    straight = trainer_for(tiny_sdxl, config, checkpoint_dir=tmp_path / "a")
    straight.train()
    first = trainer_for(tiny_sdxl, config, checkpoint_dir=tmp_path / "b")
    first.train(max_steps=2)
    resumed = trainer_for(tiny_sdxl, config, checkpoint_dir=tmp_path / "b")
    resumed.train()
    for a, b in zip(straight.embeddings, resumed.embeddings, strict=True):
        assert torch.equal(a.rows, b.rows)


@pytest.fixture(scope="module")
def sdxl_bundle(tiny_sdxl, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl-job")
    inputs = [JobInput.from_text(two_square_image(), TWO, source="two.png")]
    return run_job(tiny_sdxl, inputs, TrainConfig.full_mcpl(steps=3, batch_size=2, map_timesteps=2), out,
                   options=RunOptions(samples=1, sample_steps=2, progress=False))


def test_concept_loads_into_a_fresh_pipeline_with_diffusers_own_loader_and_generates(sdxl_bundle, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    folder = sdxl_bundle.out_dir / "concepts" / "c1"
    first, second = load_file(str(folder / "learned_embeds.safetensors")), load_file(
        str(folder / "learned_embeds_2.safetensors"))
    assert first["<c1>"].shape == (1, 32) and second["<c1>"].shape == (1, 64)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_textual_inversion(str(folder / "learned_embeds.safetensors"))
    pipe.load_textual_inversion(str(folder / "learned_embeds_2.safetensors"), text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for tokenizer, encoder, rows in ((pipe.tokenizer, pipe.text_encoder, first), (pipe.tokenizer_2, pipe.text_encoder_2,
                                                                              second)):
        token_id = tokenizer.convert_tokens_to_ids("<c1>")
        assert torch.allclose(encoder.get_input_embeddings().weight[token_id], rows["<c1>"][0])
    image = pipe("a photo of <c1>", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3)
    assert (sdxl_bundle.out_dir / "samples" / "c1.png").exists()  # mcpl's own sampling went through too


def test_one_file_export_has_clip_l_and_clip_g_of_the_models_widths(sdxl_bundle, tmp_path):
    from mcpl.concepts.embeddings import export_concept

    src = sdxl_bundle.out_dir / "concepts" / "c2" / "learned_embeds.safetensors"
    for fmt in ("a1111", "comfyui", "kohya"):
        tensors = load_file(str(export_concept(src, tmp_path / fmt, fmt, name="c2")))
        assert set(tensors) == {"clip_l", "clip_g"}
        assert tensors["clip_l"].shape == (1, 32) and tensors["clip_g"].shape == (1, 64)
    diffusers_file = export_concept(src, tmp_path / "d", "diffusers", name="c2")
    assert load_file(str(diffusers_file))["<c2>"].shape == (1, 32)
    assert load_file(str(diffusers_file.with_name("c2_2.safetensors")))["<c2>"].shape == (1, 64)


def test_legacy_eos_id_is_pointed_at_the_real_end_token(tiny_sdxl, tmp_path):
    """Old CLIP configs (eos_token_id=2) pool at the highest id: with added tokens that is the placeholder."""
    import json
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_sdxl, legacy)
    for sub in ("text_encoder", "text_encoder_2"):
        config = json.loads((legacy / sub / "config.json").read_text())
        (legacy / sub / "config.json").write_text(json.dumps({**config, "eos_token_id": 2}))
    c = load_components(str(legacy))
    assert [s.encoder.config.eos_token_id for s in c.stacks] == [1, 1]
