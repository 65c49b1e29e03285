"""Fast checks of the toy world (renderer, dataset, tokenizer, model folder, checker).

Nothing here trains the text-to-image model; pretraining never runs in CI.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mcpl.toyworld import dataset as D  # noqa: E402
from mcpl.toyworld.render import (  # noqa: E402
    ALL_PAIRS,
    COLOURS,
    HELDOUT_PAIRS,
    SHAPES,
    TRAIN_PAIRS,
    render,
    sample_scene,
)
from mcpl.toyworld.tokenizer import build_tokenizer, caption_words, whole_words  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "toyworld"
CHECKER_DIR = ROOT / "models" / "toyworld-checker"


def test_renderer_is_deterministic() -> None:
    a, b = render(sample_scene(123)), render(sample_scene(123))
    assert np.array_equal(a.image, b.image)
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks, strict=True))
    assert a.caption == b.caption
    c = render(sample_scene(124))
    assert not np.array_equal(a.image, c.image)


def test_masks_match_pixels_and_are_disjoint() -> None:
    for seed in range(40):
        r = render(sample_scene(seed))
        union = np.zeros(r.image.shape[:2], bool)
        for obj, mask, soft in zip(r.scene.objects, r.masks, r.soft_masks, strict=True):
            assert mask.sum() >= 20
            assert not (union & mask).any()
            union |= mask
            full = soft >= 0.999
            dist = np.linalg.norm(r.image[full].astype(float) - np.array(obj.rgb), axis=-1)
            assert dist.max() < 8
        covered = np.sum(r.soft_masks, axis=0)
        bg = r.image[covered <= 0.001].astype(float)
        palette = np.array(list(COLOURS.values()), float)
        assert np.linalg.norm(bg[:, None] - palette[None], axis=-1).min() > 120


def test_captions_mention_each_object_once() -> None:
    for seed in range(40):
        r = render(sample_scene(seed))
        for o in r.scene.objects:
            assert r.caption.count(f"{o.colour} {o.shape}") == 1
        assert r.caption.count(" and ") == len(r.scene.objects) - 1
        assert set(r.caption.split()) <= set(caption_words())


def test_heldout_pairs_never_in_training_scenes() -> None:
    assert len(ALL_PAIRS) == len(COLOURS) * len(SHAPES)
    assert not set(HELDOUT_PAIRS) & set(TRAIN_PAIRS)
    assert {c for c, _ in HELDOUT_PAIRS} == set(COLOURS) and {s for _, s in HELDOUT_PAIRS} == set(SHAPES)
    for seed in range(200):
        for o in sample_scene(seed, pairs=TRAIN_PAIRS).objects:
            assert (o.colour, o.shape) not in HELDOUT_PAIRS


def test_dataset_rows_follow_format(tmp_path: Path) -> None:
    D.write_dataset(tmp_path, n=4, objects=2, style="generic")
    D.write_dataset(tmp_path / "named", n=3, objects=0 or None, style="shape")
    marker = re.compile(r"<([A-Za-z0-9_-]+)(?:\|([^|<>]+))?(?:\|([^|<>]+))?>")
    for folder in (tmp_path, tmp_path / "named"):
        lines = (folder / "rows.jsonl").read_text().splitlines()
        assert lines
        for line in lines:
            row = json.loads(line)
            assert set(row) <= {"image", "sentence", "masks", "group", "overrides", "meta"}
            assert (folder / row["image"]).is_file()
            names = [f"<{m.group(1)}>" for m in marker.finditer(row["sentence"])]
            assert len(names) == len(set(names)) == len(row["meta"]["objects"])
            for m in marker.finditer(row["sentence"]):
                if m.group(3):
                    assert m.group(3) in row["sentence"].replace(m.group(0), " ").split()
            assert set(row["masks"]) == set(names)
            for rel in row["masks"].values():
                p = (folder / rel).resolve()
                assert p.is_file() and folder.resolve() in p.parents
            for o in row["meta"]["objects"]:
                assert o["colour"] in COLOURS and o["shape"] in SHAPES and len(o["bbox"]) == 4


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    tok = build_tokenizer()
    ids = tok("a red circle").input_ids
    toks = tok.convert_ids_to_tokens(ids)
    assert toks == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    for w in whole_words():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    assert tok.unk_token_id not in tok("zebra 42 x-ray", add_special_tokens=False).input_ids
    padded = tok("a red circle", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == tok.model_max_length and padded[-1] == tok.pad_token_id == tok.eos_token_id
    tok.save_pretrained(str(tmp_path))
    from transformers import CLIPTokenizer

    again = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert again("a red circle").input_ids == ids and again.model_max_length == tok.model_max_length
    n = len(again)
    again.add_tokens(["<obj1>"])
    assert again("a <obj1>", add_special_tokens=False).input_ids == [ids[1], n]


def test_grounding_loss_is_zero_when_attention_is_inside_masks() -> None:
    from mcpl.toyworld.pretrain import MAX_OBJ, grounding_loss, word_positions

    n_obj = torch.tensor([2])
    pos = word_positions(n_obj)
    assert pos[0].tolist() == [[2, 3], [6, 7], [0, 0]]
    m16 = torch.zeros(1, MAX_OBJ, 16, 16)
    m16[0, 0, :8], m16[0, 1, 8:] = 1, 1
    probs = torch.zeros(1, 256, 16)
    probs[0, :128, 2:4] = 1.0 / 128
    probs[0, 128:, 6:8] = 1.0 / 128
    store = {"maps": {"l": [probs]}}
    valid = torch.tensor([[True, True, False]])
    m8 = torch.zeros(1, MAX_OBJ, 8, 8)
    assert float(grounding_loss(store, pos, valid, m16, m8)) == pytest.approx(0.0, abs=1e-6)
    swapped = {"maps": {"l": [probs[:, :, [0, 1, 6, 7, 4, 5, 2, 3, *range(8, 16)]]]}}
    assert float(grounding_loss(swapped, pos, valid, m16, m8)) == pytest.approx(1.0, abs=1e-6)


def test_grounding_cover_term_prefers_maps_that_fill_the_object() -> None:
    from mcpl.toyworld.pretrain import MAX_OBJ, grounding_loss, word_positions

    pos, valid = word_positions(torch.tensor([1])), torch.tensor([[True, False, False]])
    m16 = torch.zeros(1, MAX_OBJ, 16, 16)
    m16[0, 0, 4:8, 4:8] = 1
    m8 = torch.zeros(1, MAX_OBJ, 8, 8)
    inside = m16[0, 0].flatten().nonzero()[:, 0]
    uniform = torch.zeros(1, 256, 16)
    uniform[0, inside, 2:4] = 1.0 / len(inside)
    point = torch.zeros(1, 256, 16)
    point[0, inside[5], 2:4] = 1.0
    for cover in (0.0, 1.0):
        loss_u = float(grounding_loss({"maps": {"l": [uniform]}}, pos, valid, m16, m8, cover))
        assert loss_u == pytest.approx(0.0, abs=1e-5)
    assert float(grounding_loss({"maps": {"l": [point]}}, pos, valid, m16, m8, 0.0)) == pytest.approx(0.0, abs=1e-5)
    assert float(grounding_loss({"maps": {"l": [point]}}, pos, valid, m16, m8, 1.0)) == pytest.approx(0.75, abs=1e-5)


@pytest.mark.skipif(not (MODEL_DIR / "model_index.json").exists(), reason="no pretrained toy model yet")
def test_model_folder_loads_with_diffusers() -> None:
    from diffusers import StableDiffusionPipeline

    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 50 * 2**20
    assert not list(MODEL_DIR.rglob("*.bin"))
    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL_DIR))
    assert pipe.scheduler.config.steps_offset == 1
    assert pipe.scheduler.config.prediction_type == "epsilon"
    out = pipe(
        "a red circle",
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert out.images.shape == (1, 32, 32, 3)


@pytest.mark.skipif(not (CHECKER_DIR / "shape_net.safetensors").exists(), reason="checker not trained")
def test_checker_accuracy_on_renders() -> None:
    from mcpl.toyworld.checker import Checker, evaluate

    res = evaluate(Checker.load(CHECKER_DIR), range(4_000_000, 4_000_150))
    assert res["colour_acc"] >= 0.99 and res["shape_acc"] >= 0.99 and res["scene_acc"] >= 0.98
