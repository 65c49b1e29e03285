"""Packed jobs: one UNet call per step for several jobs, each exactly as if it trained alone."""

from __future__ import annotations

import pytest
import torch
from helpers.images import two_square_image

from mcpl.config import TrainConfig
from mcpl.method.inputs import JobInput
from mcpl.method.models import load_components
from mcpl.method.packing import PackedJob, PackedTrainer
from mcpl.method.trainer import MCPLTrainer

SENTENCES = ["a photo of a red <c1|object|red> and a blue <c2|thing|blue>", "a <k1|thing> next to a <k2|object>",
             "a green <g1|object|green>"]
IMAGES = [two_square_image(), two_square_image(((0, 200, 0), (250, 250, 0))), two_square_image(((9, 9, 9),) * 2)]
CONFIGS = [TrainConfig.full_mcpl(steps=5, batch_size=2, seed=1), TrainConfig(steps=4, batch_size=3, seed=2),
           TrainConfig(attn_mask=True, steps=6, batch_size=1, seed=3, mask_source="running")]


def jobs(checkpoints=None, callbacks=None) -> list[PackedJob]:
    return [PackedJob([JobInput.from_text(img, s)], cfg, checkpoints[i] if checkpoints else None,
                      (callbacks or {}).get(i, []))
            for i, (img, s, cfg) in enumerate(zip(IMAGES, SENTENCES, CONFIGS, strict=True))]


def alone(model, i, checkpoint_dir=None) -> MCPLTrainer:
    trainer = MCPLTrainer(load_components(model), [JobInput.from_text(IMAGES[i], SENTENCES[i])], CONFIGS[i],
                          checkpoint_dir, progress=False)
    trainer.train()
    trainer.close()
    return trainer


def test_a_packed_job_equals_the_same_job_trained_alone(tiny_model):
    c = load_components(tiny_model)
    pack = PackedTrainer(c, jobs())
    results = pack.train()
    pack.close()
    for i, result in enumerate(results):
        expected = alone(tiny_model, i)
        assert not isinstance(result, BaseException), result
        for token, vectors in expected.learned_vectors().items():
            assert torch.allclose(result[token], vectors, atol=1e-5), (i, token)
        assert [h["step"] for h in pack.trainers[i].history] == list(range(1, CONFIGS[i].steps + 1))
        losses = [h["loss"] for h in pack.trainers[i].history]
        assert losses == pytest.approx([h["loss"] for h in expected.history], abs=1e-5)
    # the frozen model is handed back untouched
    assert {type(p).__name__ for p in c.unet.attn_processors.values()} != {"CaptureProcessor"}


class Crash:
    def on_step(self, step, logs):
        if step == 2:
            raise RuntimeError("job 1 crashed at step 2")

    def on_checkpoint(self, step, path):
        pass


def test_a_failing_job_leaves_the_pack_and_the_others_are_undisturbed(tiny_model):
    pack = PackedTrainer(load_components(tiny_model), jobs(callbacks={1: [Crash()]}))
    results = pack.train()
    assert isinstance(results[1], RuntimeError) and "step 2" in str(results[1])
    for i in (0, 2):
        expected = alone(tiny_model, i).learned_vectors()
        assert all(torch.allclose(results[i][t], v, atol=1e-5) for t, v in expected.items())


def test_a_resumed_job_in_a_pack_continues_from_its_checkpoint(tiny_model, tmp_path):
    dirs = [tmp_path / f"j{i}" for i in range(3)]
    first = MCPLTrainer(load_components(tiny_model), [JobInput.from_text(IMAGES[0], SENTENCES[0])],
                        CONFIGS[0].model_copy(update={"checkpoint_every": 2}), dirs[0], progress=False)
    first.train(max_steps=2)  # job 0 was interrupted after 2 steps
    packed = jobs(dirs)
    packed[0].config = CONFIGS[0].model_copy(update={"checkpoint_every": 2})
    pack = PackedTrainer(load_components(tiny_model), packed)
    results = pack.train()
    assert pack.trainers[0].history[0]["step"] == 1 and len(pack.trainers[0].history) == 5
    straight = alone(tiny_model, 0, tmp_path / "straight")
    assert all(torch.allclose(results[0][t], v, atol=1e-5) for t, v in straight.learned_vectors().items())
