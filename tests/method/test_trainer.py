"""The training engine on a tiny random SD model loaded through the real loading path."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers.images import two_square_image

from mcpl.config import TrainConfig
from mcpl.errors import ModelLoadError
from mcpl.method.attention import AttentionStore, cross_attention_layers, install_capture, select_layers, union_mask
from mcpl.method.inputs import JobInput
from mcpl.method.learned import frozen_table, initializer_embedding
from mcpl.method.losses import prompt_contrastive_loss
from mcpl.method.models import load_components
from mcpl.method.prompts import SentenceError
from mcpl.method.trainer import MCPLTrainer

TWO = "a photo of a red <c1|object|red> and a blue <c2|thing|blue>"


def make_trainer(model: str, config: TrainConfig, sentences=(TWO,), checkpoint_dir=None, images=None) -> MCPLTrainer:
    images = images or [two_square_image()] * len(sentences)
    inputs = [JobInput.from_text(img, s) for img, s in zip(images, sentences, strict=True)]
    return MCPLTrainer(load_components(model), inputs, config, checkpoint_dir=checkpoint_dir, progress=False)


def test_only_the_new_rows_change(tiny_model):
    trainer = make_trainer(tiny_model, TrainConfig.full_mcpl(steps=4))
    c = trainer.c
    frozen = {f"unet.{k}": v.clone() for k, v in c.unet.state_dict().items()}
    frozen.update({f"vae.{k}": v.clone() for k, v in c.vae.state_dict().items()})
    frozen.update({f"text.{k}": v.clone() for k, v in c.text_encoder.state_dict().items() if "rows" not in k})
    start = trainer.embedding.rows.detach().clone()
    with trainer.prompts.attached():  # rows are spliced in only while the text is encoded
        trainable = [p for m in (c.unet, c.vae, c.text_encoder) for p in m.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is trainer.embedding.rows
    trainer.train()
    after = {f"unet.{k}": v for k, v in c.unet.state_dict().items()}
    after.update({f"vae.{k}": v for k, v in c.vae.state_dict().items()})
    after.update({f"text.{k}": v for k, v in c.text_encoder.state_dict().items() if "rows" not in k})
    assert after.keys() == frozen.keys()
    assert all(torch.equal(after[k], frozen[k]) for k in frozen)
    assert not torch.equal(trainer.embedding.rows.detach(), start)
    assert trainer.embedding.rows.dtype == torch.float32


def test_new_tokens_start_from_their_own_initializers(tiny_model):
    trainer = make_trainer(tiny_model, TrainConfig(num_vectors=2))
    rows = trainer.embedding.rows.detach()
    obj = initializer_embedding(trainer.c, "object")
    thing = initializer_embedding(trainer.c, "thing")
    for i, expected in enumerate([obj, obj, thing, thing]):
        assert torch.allclose(rows[i], expected)


def test_learned_rows_replace_only_new_ids(tiny_model):
    trainer = make_trainer(tiny_model, TrainConfig())
    tok = trainer.c.tokenizer
    ids = tok(["a red <c1> and <c2>"], return_tensors="pt").input_ids
    emb = trainer.embedding(ids)[0]
    table = frozen_table(trainer.c.text_encoder)
    for pos, i in enumerate(ids[0].tolist()):
        expected = trainer.embedding.rows[i - trainer.embedding.first_new_id] if i >= trainer.embedding.first_new_id \
            else table[i]
        assert torch.allclose(emb[pos], expected)


def test_capture_processor_computes_the_same_output(tiny_model):
    c = load_components(tiny_model)
    torch.manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, c.tokenizer.model_max_length, 32)
    t = torch.tensor([10, 500])
    reference = c.unet(latents, t, encoder_hidden_states=text).sample
    store = AttentionStore()
    store.key_weights = torch.rand(2, 3, c.tokenizer.model_max_length)
    store.latent_hw = (8, 8)
    install_capture(c.unet, store, select_layers(c.unet, ["attn2"]))
    captured = c.unet(latents, t, encoder_hidden_states=text).sample
    assert torch.allclose(reference, captured, atol=1e-5)
    store.enabled = False  # not recording: the fused path must agree too
    assert torch.allclose(reference, c.unet(latents, t, encoder_hidden_states=text).sample, atol=1e-5)
    store.enabled = True
    assert len(store.maps) == len(cross_attention_layers(c.unet)) == 4
    assert store.maps[0].shape[:2] == (2, 3)


def test_batch_of_two_images_gives_the_same_masks_as_each_alone(tiny_model):
    """Catches masks taken from the wrong samples (the paper code's CFG halving, OR with sample 0)."""
    images = [two_square_image(), two_square_image(((0, 200, 0), (250, 250, 0)))]
    sentences = ["a red <c1|object|red> and a blue <c2|thing|blue>", "a <c2|thing|blue> blue and <c1|object|red> red"]
    trainer = make_trainer(tiny_model, TrainConfig(strategy="diverse", attention_layers=["attn2"]), sentences,
                           images=images)
    g = torch.Generator().manual_seed(0)
    index, flip = torch.tensor([0, 1]), torch.tensor([False, True])
    latents = trainer.latents.sample(index, flip, torch.randn(2, 4, 8, 8, generator=g))
    noise = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([300, 700])
    noisy = trainer.c.scheduler.add_noise(latents, noise, t)
    text = trainer.encode_prompts([0, 1], ["{}", "a photo of {}"])
    with torch.no_grad():
        hidden = trainer.encode_text(text)
        _, both = trainer.predict_with_maps(noisy, t, hidden, text.concept_weights)
        alone = [trainer.predict_with_maps(noisy[i:i + 1], t[i:i + 1], hidden.select(slice(i, i + 1)),
                                           text.concept_weights[i:i + 1])[1] for i in range(2)]
    for i in range(2):
        assert torch.allclose(both[i], alone[i][0], atol=1e-6)
        for k in (0.3, 0.5, 0.7):
            assert torch.equal(union_mask(both[i:i + 1], k, (8, 8)), union_mask(alone[i], k, (8, 8)))
    assert not torch.allclose(both[0], both[1], atol=1e-4), "the two samples should attend differently"


def test_mask_is_exactly_the_thresholded_union():
    maps = torch.zeros(2, 2, 4, 4)
    maps[0, 0, 0, 0], maps[0, 0, 0, 1], maps[0, 0, 1, 1] = 2.0, 1.2, 0.8  # /2 -> 1, .6, .4
    maps[0, 1, 3, 3], maps[0, 1, 3, 2] = 0.2, 0.11  # /0.2 -> 1, .55
    maps[1, 0] = 0.1  # flat map: everything equals the max -> all kept
    maps[1, 1, 2, 2] = 5.0
    mask = union_mask(maps, 0.5, (8, 8))
    expected_small = torch.zeros(2, 1, 4, 4)
    expected_small[0, 0, 0, 0] = expected_small[0, 0, 0, 1] = 1
    expected_small[0, 0, 3, 3] = expected_small[0, 0, 3, 2] = 1
    expected_small[1, 0] = 1
    expected = expected_small.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.equal(mask, expected)
    assert union_mask(maps, 0.5, (8, 8)).requires_grad is False
    assert torch.equal(union_mask(maps, 0.65, (4, 4))[0, 0], torch.tensor(
        [[1., 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]))


@pytest.mark.parametrize("strategy, sentences", [
    ("one", (TWO,)),
    ("all", (TWO,)),
    ("diverse", ("a red <c1|object|red> and a blue <c2|thing|blue>",
                 "a blue <c2|thing|blue> by a red <c1|object|red>")),
])
def test_prompt_cl_gives_gradient_to_every_learned_row(tiny_model, strategy, sentences):
    config = TrainConfig(strategy=strategy, prompt_cl=True, bind_adj=True, num_vectors=2, cl_views=2)
    trainer = make_trainer(tiny_model, config, sentences)
    n = len(sentences)
    index = [i % n for i in range(4)] * 2
    templates = [trainer.plan.templates[(k // 4) % len(trainer.plan.templates)] for k in range(8)]
    text = trainer.encode_prompts(index, templates)
    loss = trainer.contrastive_loss([(trainer.encode_text(text).hidden, text)])
    loss.backward()
    grad = trainer.embedding.rows.grad
    assert grad is not None and loss.item() > 0
    assert (grad.norm(dim=-1) > 0).all(), grad.norm(dim=-1)


def test_bind_adj_adds_the_adjective_as_a_positive(tiny_model):
    plain = make_trainer(tiny_model, TrainConfig(prompt_cl=True))
    bound = make_trainer(tiny_model, TrainConfig(prompt_cl=True, bind_adj=True))
    with torch.no_grad():
        bound.embedding.rows.copy_(plain.embedding.rows)
    args = ([0, 0, 0, 0], ["{}", "a photo of {}", "{}", "a rendering of {}"])
    t_plain, t_bound = plain.encode_prompts(*args), bound.encode_prompts(*args)
    assert t_plain.adjective_weights.sum() == 0
    red = bound.c.tokenizer("red", add_special_tokens=False).input_ids[0]
    blue = bound.c.tokenizer("blue", add_special_tokens=False).input_ids[0]
    for row in range(4):
        ids = t_bound.ids[0][row]
        assert torch.equal(t_bound.adjective_weights[row, 0] > 0, ids == red)
        assert torch.equal(t_bound.adjective_weights[row, 1] > 0, ids == blue)
    with torch.no_grad():
        loss_plain = plain.contrastive_loss([(plain.encode_text(t_plain).hidden, t_plain)])
        loss_bound = bound.contrastive_loss([(bound.encode_text(t_bound).hidden, t_bound)])
    assert not torch.isclose(loss_plain, loss_bound)


def test_contrastive_loss_matches_hand_computation():
    f = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    labels, anchors, tau = torch.tensor([0, 0, 1, 1]), torch.tensor([True, True, True, False]), 0.5
    sim = (f @ f.T) / tau
    expected = []
    for i, j in ((0, 1), (1, 0), (2, 3)):
        others = [k for k in range(4) if k != i]
        expected.append(-(sim[i, j] - torch.logsumexp(sim[i, others], 0)))
    got = prompt_contrastive_loss(f, labels, anchors, tau)
    assert torch.isclose(got, torch.stack(expected).mean())
    # the adjective-like item (index 3) changes the result when it is a positive
    without = prompt_contrastive_loss(f[:3], labels[:3], anchors[:3], tau)
    assert not torch.isclose(got, without)


def test_short_prompt_cl_views_match_full_length_features(tiny_model):
    """PromptCL-only views are encoded without padding to the max: features must not change."""
    trainer = make_trainer(tiny_model, TrainConfig(prompt_cl=True))
    args = ([0, 0], ["{}", "a photo of {}"])
    full, short = trainer.encode_prompts(*args), trainer.encode_prompts(*args, full_length=False)
    assert short.ids[0].shape[1] < full.ids[0].shape[1]
    with torch.no_grad():
        f_full = torch.einsum("ncl,nld->ncd", full.concept_weights, trainer.encode_text(full).hidden)
        f_short = torch.einsum("ncl,nld->ncd", short.concept_weights, trainer.encode_text(short).hidden)
    assert torch.allclose(f_full, f_short, atol=1e-5)


def test_running_mask_source_averages_over_steps(tiny_model):
    trainer = make_trainer(tiny_model, TrainConfig(attn_mask=True, mask_source="running", steps=3, batch_size=2))
    trainer.train()
    assert trainer.running_maps is not None
    assert int(trainer.running_count.sum()) == 6
    assert all(0 < h["mask_fraction"] <= 1 for h in trainer.history)


def test_resume_equals_uninterrupted(tiny_model, tmp_path):
    config = TrainConfig.full_mcpl(steps=6, checkpoint_every=2, mask_source="running", batch_size=2)
    straight = make_trainer(tiny_model, config, checkpoint_dir=tmp_path / "a").train()
    first = make_trainer(tiny_model, config, checkpoint_dir=tmp_path / "b")
    first.train(max_steps=3)  # stops after step 3; newest checkpoint is step 2
    resumed = make_trainer(tiny_model, config, checkpoint_dir=tmp_path / "b")
    steps_seen = []

    class Recorder:
        def on_step(self, step, logs):
            steps_seen.append(step)

        def on_checkpoint(self, step, path):
            pass

    resumed.callbacks.append(Recorder())
    final = resumed.train()
    assert steps_seen[0] == 3, "resume should continue from the step-2 checkpoint"
    for token in straight:
        assert torch.equal(straight[token], final[token]), token


def test_resume_refuses_checkpoints_of_another_job(tiny_model, tmp_path):
    make_trainer(tiny_model, TrainConfig(steps=2, checkpoint_every=1), checkpoint_dir=tmp_path).train()
    with pytest.raises(RuntimeError, match="different job"):
        make_trainer(tiny_model, TrainConfig(steps=2, checkpoint_every=1, seed=5), checkpoint_dir=tmp_path).train()


def test_v_prediction_target(tiny_model):
    trainer = make_trainer(tiny_model, TrainConfig())
    trainer.c.scheduler.register_to_config(prediction_type="v_prediction")
    z, n, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([400])
    assert torch.allclose(trainer._target(z, n, t), trainer.c.scheduler.get_velocity(z, n, t))


def test_split_initializer_is_averaged_with_a_warning(tiny_model):
    c = load_components(tiny_model)
    pieces = c.tokenizer("zebra", add_special_tokens=False).input_ids
    assert len(pieces) > 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb = initializer_embedding(c, "zebra")
    assert any("averaged" in str(w.message) for w in caught)
    assert torch.allclose(emb, frozen_table(c.text_encoder)[pieces].mean(0))


def test_unknown_initializer_and_known_placeholder_are_rejected(tiny_model):
    with pytest.raises(SentenceError, match="not known"):
        make_trainer(tiny_model, TrainConfig(), ("a <c1|été>",))
    with pytest.raises(SentenceError, match="already in the tokenizer"):
        c = load_components(tiny_model)
        c.tokenizer.add_tokens(["<c1>"])
        c.text_encoder.resize_token_embeddings(len(c.tokenizer))
        MCPLTrainer(c, [JobInput.from_text(two_square_image(), "a <c1>")], TrainConfig(), progress=False)


def test_too_long_sentence_is_a_clear_error(tiny_model):
    long = "a " + " ".join(["red"] * 40) + " <c1>"
    with pytest.raises(SentenceError, match="longer than the model"):
        make_trainer(tiny_model, TrainConfig(), (long,))


def test_model_loading_errors(tiny_model, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_components(str(tmp_path / "nope"))
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="missing tokenizer, text_encoder, vae, scheduler"):
        load_components(str(tmp_path / "partial"))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_components("someone/not-a-cached-model")


def test_components_are_reusable_after_a_job(tiny_model):
    c = load_components(tiny_model)
    vocab, embedding = len(c.tokenizer), c.text_encoder.get_input_embeddings()
    processors = {k: type(v) for k, v in c.unet.attn_processors.items()}
    first = MCPLTrainer(c, [JobInput.from_text(two_square_image(), TWO)], TrainConfig(steps=1), progress=False)
    first.train()
    first.close()
    assert len(c.tokenizer) == vocab and c.text_encoder.get_input_embeddings() is embedding
    assert {k: type(v) for k, v in c.unet.attn_processors.items()} == processors
    second = MCPLTrainer(c, [JobInput.from_text(two_square_image(), TWO)], TrainConfig(steps=1), progress=False)
    assert second.embedding.first_new_id == vocab


def test_model_hints_set_learning_rate_and_templates_unless_config_overrides(tiny_model, tmp_path):
    import json
    import shutil

    from mcpl.method.model_files import HINTS_FILE

    hinted = tmp_path / "hinted"
    shutil.copytree(tiny_model, hinted)
    (hinted / HINTS_FILE).write_text(json.dumps({"learning_rate": 0.0123, "templates": ["{}"]}))
    plain = make_trainer(tiny_model, TrainConfig(steps=1))
    trainer = make_trainer(str(hinted), TrainConfig(steps=1))
    assert trainer.lr == 0.0123 and plain.lr != 0.0123
    assert trainer.plan.templates == ["{}"]
    assert make_trainer(str(hinted), TrainConfig(steps=1, learning_rate=0.002)).lr == 0.002


def test_gradient_checkpointing_gives_the_same_rows(tiny_model):
    """A memory option, not a different method: the learned rows match a run without it."""
    config = TrainConfig.full_mcpl(steps=3, batch_size=2)
    plain = make_trainer(tiny_model, config)
    plain.train()
    inputs = [JobInput.from_text(two_square_image(), TWO)]
    checkpointed = MCPLTrainer(load_components(tiny_model), inputs, config, progress=False,
                               gradient_checkpointing=True)
    assert checkpointed.c.unet.is_gradient_checkpointing
    checkpointed.train()
    assert torch.allclose(plain.embedding.rows, checkpointed.embedding.rows, atol=1e-5)


def test_a_step_reads_nothing_back_from_the_device_until_logs_are_flushed(tiny_model):
    """Losses stay tensors in the step; numbers are made only when logs are flushed (every N steps on a GPU)."""
    trainer = MCPLTrainer(load_components(tiny_model), [JobInput.from_text(two_square_image(), TWO)],
                          TrainConfig.full_mcpl(steps=4, batch_size=2), progress=False, log_every=3)
    seen = []

    class Watch:
        def on_step(self, step, logs):
            seen.append(step)

        def on_checkpoint(self, step, path):
            pass

    trainer.callbacks.append(Watch())
    end = trainer.begin()
    logs = trainer._step()
    assert all(isinstance(v, torch.Tensor) for k, v in logs.items() if k != "lr")
    trainer.record(logs, 0.0)
    assert seen == [] and trainer.history == []  # pending: not read back yet
    for _ in range(2):
        trainer.record(trainer._step(), 0.0)
    assert seen == [1, 2, 3]
    while trainer.step < end:
        trainer.record(trainer._step(), 0.0)
    trainer.end()
    assert seen == [1, 2, 3, 4] and [h["step"] for h in trainer.history] == [1, 2, 3, 4]


def step_prompts(trainer):
    """One training step; the prompt batches it encoded: the UNet's, then any extra PromptCL view."""
    seen = []
    encode = trainer.prompts.encode_prompts

    def spy(*args, **kwargs):
        seen.append(encode(*args, **kwargs))
        return seen[-1]

    trainer.prompts.encode_prompts = spy
    try:
        trainer.train_step()
    finally:
        trainer.prompts.encode_prompts = encode
    return seen


def test_prompt_cl_views_differ_from_the_training_prompt_with_one_template(tiny_model):
    """With a single template (the toy model's hints) both PromptCL views are the same prompt;
    with cl_reorder the extra view lists the phrases in another order, Bind adj following them."""
    trainer = make_trainer(tiny_model, TrainConfig(prompt_cl=True, bind_adj=True, use_templates=False, batch_size=2,
                                                   cl_reorder=True, phrase_shuffle=0.0))
    assert trainer.plan.templates == ["{}"]
    main, extra = step_prompts(trainer)
    assert extra.ids[0].shape[0] == main.ids[0].shape[0] == 2
    tok = trainer.prompts.tokenizer
    for row in range(2):
        words = tok.convert_ids_to_tokens(extra.ids[0][row].tolist())
        assert "blue</w>" in words and words.index("blue</w>") < words.index("red</w>")  # swapped phrases
        first = main.concept_weights[row, 0].nonzero().item()
        moved = extra.concept_weights[row, 0].nonzero().item()
        assert moved > first  # <c1> comes after the <c2> phrase now
        assert extra.adjective_weights[row, 0].nonzero().item() == moved - 1  # "red" still binds to <c1>


def test_prompt_cl_views_keep_the_written_order_by_default(tiny_model):
    trainer = make_trainer(tiny_model, TrainConfig(prompt_cl=True, use_templates=False, batch_size=2,
                                                   phrase_shuffle=0.0))
    main, extra = step_prompts(trainer)
    length = extra.ids[0].shape[1]
    assert torch.equal(extra.ids[0], main.ids[0][:, :length])  # the written sentence, cut at its end (causal CLIP)


def test_phrase_shuffle_trains_each_concept_in_both_places(tiny_model):
    """phrase_shuffle=1: every UNet prompt lists the phrases in the other order, concepts and Bind adj following;
    at 0 (the paper's prompts), the written order and that setting's random stream are untouched."""
    trainer = make_trainer(tiny_model, TrainConfig(prompt_cl=True, bind_adj=True, use_templates=False, batch_size=2,
                                                   phrase_shuffle=1.0))
    main, _ = step_prompts(trainer)
    tok = trainer.prompts.tokenizer
    for row in range(2):
        words = tok.convert_ids_to_tokens(main.ids[0][row].tolist())
        assert words.index("blue</w>") < words.index("red</w>")
        c1, c2 = (main.concept_weights[row, c].nonzero().item() for c in (0, 1))
        assert c2 < c1 and main.adjective_weights[row, 0].nonzero().item() == c1 - 1
    plain = make_trainer(tiny_model, TrainConfig(use_templates=False, batch_size=4, phrase_shuffle=0.0))
    for _ in range(3):
        (main,) = step_prompts(plain)
        for ids in main.ids[0]:
            words = tok.convert_ids_to_tokens(ids.tolist())
            assert words.index("red</w>") < words.index("blue</w>")
    assert TrainConfig().phrase_shuffle == 0.5  # the default (chosen on validation scenes) shuffles half the prompts


def test_mcpl_all_keeps_its_learned_and_between_reordered_phrases(tiny_model):
    trainer = make_trainer(tiny_model, TrainConfig(strategy="all", use_templates=False, batch_size=1,
                                                   phrase_shuffle=1.0))
    assert trainer.plan.n_orders(0) == 2
    prompt = trainer.plan.prompt(0, "{}", 1).split()
    assert prompt[:3] == ["<w0.a>", "<w1.photo>", "<w2.of>"] and prompt.index("<w8.blue>") < prompt.index("<w4.red>")
    assert prompt[6] == "<w6.and>"


def test_phrase_shuffle_leaves_a_sentence_it_cannot_reorder_bit_identical(tiny_model):
    bare = "a photo of a <c1|object> and a <c2|object>"
    runs = [make_trainer(tiny_model, TrainConfig(steps=2, batch_size=2, phrase_shuffle=p), sentences=(bare,)).train()
            for p in (0.0, 1.0)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
