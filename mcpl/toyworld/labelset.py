"""A labelled set of *generated* toy-world images, to measure the checker where it matters.

    python -m mcpl.toyworld.labelset make --out benchmarks/data/checker_generated   # ~10 min
    python -m mcpl.toyworld.labelset score --data benchmarks/data/checker_generated

`make` samples the toy model (DDIM 20 steps, CFG 5: the MCPL benchmark's setting) on a mix
of prompts: true words for single objects of all 16 colour-shape pairs, two-object
captions, and prompts with placeholder tokens whose embeddings are untrained (initialised
from "object"), noisy, interpolated between shape or colour words, or partly trained by
textual inversion on a rendered held-out scene (3-60 steps) -- the odd blobs the MCPL
benchmark has to judge. It writes `images.npz` (uint8 N,32,32,3), `meta.json` (prompt and
how its tokens were made, per image) and contact sheets `sheet_<k>.png` (8x8 images,
upscaled, numbered; no prompts, so labels say what is drawn, not what was asked).

Labels (`labels.json`, written by hand from the sheets): per image a list of objects, each
`"<colour> <shape>"` with colour in red/green/blue/yellow, `other` (an off-palette colour,
e.g. orange, purple, brown) or `mixed` (two palette colours in one blob), and shape in the
four shapes or `unclear`; `[]` = nothing drawn. `score` compares the checker with them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mcpl.toyworld.render import ALL_PAIRS, COLOURS, HELDOUT_PAIRS, SHAPES, caption, render, sample_scene  # noqa: E402

DEFAULT_DATA = "benchmarks/data/checker_generated"
SHEET = 8  # images per sheet side
SCALE = 6  # upscaling of each image on a sheet
TUNE_FRACTION = 0.5  # the first half of a seeded permutation tunes the checker, the rest is held back


# ----------------------------------------------------------------------------- making


def _embed(model, word: str) -> torch.Tensor:
    ids = model.tok(word, add_special_tokens=False).input_ids
    assert len(ids) == 1, word
    return model.text.get_input_embeddings().weight[ids[0]].detach().clone()


def add_tokens(model, vectors: dict[str, torch.Tensor]) -> None:
    """Add placeholder tokens with given input embeddings to a gates.ToyModel."""
    model.tok.add_tokens(list(vectors))
    model.text.resize_token_embeddings(len(model.tok))
    weight = model.text.get_input_embeddings().weight
    with torch.no_grad():
        for name, vec in vectors.items():
            weight[model.tok.convert_tokens_to_ids(name)] = vec


def partly_train(model, rendered, names: list[str], steps: int, seed: int, lr: float = 3e-3) -> dict:
    """Textual inversion of `names` (one per object, initialised from "object") on one render.

    The sentence is the benchmark's `a <colour> <name> and ...`; plain noise loss, batch 4.
    Returns the learned input embeddings.
    """
    add_tokens(model, {n: _embed(model, "object") for n in names})
    sentence = " and ".join(f"a {o.colour} {n}" for o, n in zip(rendered.scene.objects, names, strict=True))
    emb = model.text.get_input_embeddings().weight
    rows = [model.tok.convert_tokens_to_ids(n) for n in names]
    keep = torch.ones(len(emb), 1, dtype=torch.bool)
    keep[rows] = False
    emb.requires_grad_(True)
    opt = torch.optim.AdamW([emb], lr=lr, weight_decay=0.0)
    x = torch.from_numpy(rendered.image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        z0 = model.vae.encode(x).latent_dist.mean * model.vae.config.scaling_factor
    g = torch.Generator().manual_seed(seed)
    ids = model.tok([sentence] * 4, padding="max_length", max_length=model.tok.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    for _ in range(steps):
        noise = torch.randn((4, *z0.shape[1:]), generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        zt = model.sched.add_noise(z0.expand(4, -1, -1, -1), noise, t)
        pred = model.unet(zt, t, encoder_hidden_states=model.text(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        emb.grad.masked_fill_(keep, 0.0)
        opt.step()
    emb.requires_grad_(False)
    return {n: emb[r].detach().clone() for n, r in zip(names, rows, strict=True)}


def build_prompts(model, seed: int = 0) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Prompt records (prompt, seed, group, how) and the placeholder vectors they use."""
    rng = np.random.default_rng(seed)
    recs: list[dict] = []
    vectors: dict[str, torch.Tensor] = {}
    colours, shapes = list(COLOURS), list(SHAPES)

    def add(prompt: str, group: str, how: str = "", n: int = 1) -> None:
        for _ in range(n):
            recs.append({"prompt": prompt, "group": group, "how": how, "seed": 0})

    # True words: every pair, plain shapes, two objects.
    for c, s in ALL_PAIRS:
        add(caption([(c, s)]), "single", n=5)
    for s in shapes:
        add(f"a {s}", "plain", n=4)
    for _ in range(48):
        i, j = rng.choice(len(ALL_PAIRS), 2, replace=False)
        a, b = ALL_PAIRS[i], ALL_PAIRS[j]
        if a[0] == b[0] or a[1] == b[1]:
            b = (colours[(colours.index(a[0]) + 1) % 4], shapes[(shapes.index(a[1]) + 2) % 4])
        add(caption([a, b]), "two")

    # Placeholders. Untrained: exactly "object".
    e = {w: _embed(model, w) for w in [*colours, *shapes, "object", "thing"]}
    vectors["<t_obj>"] = e["object"]
    add("a <t_obj>", "untrained", "object", n=6)
    for c in colours:
        add(f"a {c} <t_obj>", "untrained", "object", n=3)
    # Noisy "object": the direction of a little training.
    k = 0
    for sigma in (0.5, 1.0, 2.0):
        for _ in range(4):
            name = f"<t_noise{k}>"
            k += 1
            noise = torch.from_numpy(rng.standard_normal(e["object"].shape).astype(np.float32))
            vectors[name] = e["object"] + sigma * e["object"].std() * noise
            add(f"a {name}", "noise", f"object+{sigma}sd")
            add(f"a {colours[k % 4]} {name}", "noise", f"object+{sigma}sd")
    # Shape interpolations.
    k = 0
    for i, s1 in enumerate(shapes):
        for s2 in shapes[i + 1 :]:
            for a in (0.3, 0.5, 0.7):
                name = f"<t_shape{k}>"
                k += 1
                vectors[name] = (1 - a) * e[s1] + a * e[s2]
                how = f"{1 - a:.1f} {s1} + {a:.1f} {s2}"
                add(f"a {name}", "shape_mix", how)
                add(f"a {colours[int(rng.integers(4))]} {name}", "shape_mix", how)
    # Colour interpolations (off-palette colours) and shape/object mixes.
    k = 0
    for i, c1 in enumerate(colours):
        for c2 in colours[i + 1 :]:
            for a in (0.35, 0.5, 0.65):
                name = f"<t_col{k}>"
                k += 1
                vectors[name] = (1 - a) * e[c1] + a * e[c2]
                for s in rng.choice(shapes, 2, replace=False):
                    add(f"a {name} {s}", "colour_mix", f"{1 - a:.2f} {c1} + {a:.2f} {c2}")
    for s in shapes:
        for a in (0.3, 0.6):
            name = f"<t_half{k}>"
            k += 1
            vectors[name] = (1 - a) * e["object"] + a * e[s]
            add(f"a {name}", "object_mix", f"{1 - a:.1f} object + {a:.1f} {s}")
            add(f"a {colours[int(rng.integers(4))]} {name}", "object_mix", f"{1 - a:.1f} object + {a:.1f} {s}")
    # Two placeholders in one caption (the benchmark's training sentence).
    names = [n for n in vectors if n.startswith("<t_shape")]
    for _ in range(12):
        n1, n2 = rng.choice(names, 2, replace=False)
        c1, c2 = rng.choice(colours, 2, replace=False)
        add(f"a {c1} {n1} and a {c2} {n2}", "two_placeholders", f"{n1} {n2}")
    return recs, vectors


def trained_prompts(model, n_scenes: int = 6, steps: tuple[int, ...] = (3, 10, 25, 60)) -> tuple[list, dict]:
    """Partly trained placeholders on rendered held-out two-object scenes, 2 prompts each."""
    recs, vectors = [], {}
    pairs = [(a, b) for i, a in enumerate(HELDOUT_PAIRS) for b in HELDOUT_PAIRS[i + 1 :]]
    for sc in range(n_scenes):
        r = render(sample_scene(9000 + sc, forced=list(pairs[sc % len(pairs)])))
        for st in steps:
            names = [f"<t_ti{sc}_{st}_{j}>" for j in range(2)]
            learned = partly_train(model, r, names, st, seed=sc)
            vectors.update(learned)
            for n, o in zip(names, r.scene.objects, strict=True):
                how = f"textual inversion {st} steps on {o.colour} {o.shape} (scene {9000 + sc})"
                recs.append({"prompt": f"a {n}", "group": "trained", "how": how, "seed": 0})
                recs.append({"prompt": f"a {o.colour} {n}", "group": "trained", "how": how, "seed": 0})
    return recs, vectors


def make(out: Path, model_dir: str = "models/toyworld", seed: int = 0, batch: int = 64) -> None:
    from mcpl.toyworld.gates import ToyModel

    t0 = time.time()
    model = ToyModel(model_dir)
    recs, vectors = build_prompts(model, seed)
    trecs, tvectors = trained_prompts(model)  # adds its own tokens
    recs += trecs
    add_tokens(model, {k: v for k, v in vectors.items()})
    for i, r in enumerate(recs):
        r["seed"] = 700_000 + i
    # Shuffle so a sheet mixes groups (the labeller does not see the prompt anyway).
    order = np.random.default_rng(seed + 1).permutation(len(recs))
    recs = [recs[i] for i in order]
    images = []
    for i in range(0, len(recs), batch):
        chunk = recs[i : i + batch]
        imgs, _ = model.sample([r["prompt"] for r in chunk], [r["seed"] for r in chunk], steps=20, guidance=5.0)
        images.append(imgs)
        print(f"{i + len(chunk)}/{len(recs)} images, {time.time() - t0:.0f} s", flush=True)
    images = np.concatenate(images)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "images.npz", images=images)
    meta = {"model": model_dir, "sampler": "DDIM 20 steps, CFG 5 (gates.ToyModel.sample)", "records": recs}
    (out / "meta.json").write_text(json.dumps(meta, indent=0))
    write_sheets(images, out)
    print(f"{len(images)} images in {time.time() - t0:.0f} s -> {out}")


def write_sheets(images: np.ndarray, out: Path, titles: list[str] | None = None, stem: str = "sheet",
                 scale: int = SCALE) -> list[Path]:
    """8x8 contact sheets `<stem>_<k>.png`, each image upscaled (nearest) `scale` times and titled with
    its number (or `titles`: the MCPL benchmark's sheets name the checker's verdict)."""
    from PIL import Image, ImageDraw

    tile, pad = 32 * scale, 14
    paths = []
    per = SHEET * SHEET
    for k in range(0, len(images), per):
        sheet = Image.new("RGB", (SHEET * (tile + 4), SHEET * (tile + pad + 4)), (60, 60, 60))
        draw = ImageDraw.Draw(sheet)
        for j, img in enumerate(images[k : k + per]):
            x, y = (j % SHEET) * (tile + 4), (j // SHEET) * (tile + pad + 4)
            sheet.paste(Image.fromarray(img).resize((tile, tile), Image.NEAREST), (x, y + pad))
            draw.text((x + 2, y + 1), titles[k + j] if titles else str(k + j), fill=(255, 255, 255))
        path = out / f"{stem}_{k // per}.png"
        sheet.save(path, optimize=True)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- scoring


def load(data: str | Path = DEFAULT_DATA) -> tuple[np.ndarray, list[dict], list[list[str]]]:
    """Images, meta records and labels (one list of "<colour> <shape>" per image)."""
    data = Path(data)
    images = np.load(data / "images.npz")["images"]
    recs = json.loads((data / "meta.json").read_text())["records"]
    labels = json.loads((data / "labels.json").read_text())["labels"]
    labels = [labels[str(i)] for i in range(len(images))]
    return images, recs, labels


def split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tune, held-back) indices: a seeded permutation cut at TUNE_FRACTION."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * TUNE_FRACTION))
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def describe(found, fine: bool = False) -> list[str]:
    """Sorted "<colour> <shape>" of a checker's objects; `mixed` counts as `other` unless `fine`."""
    return sorted(_coarse(f"{f.colour} {f.shape}", fine) for f in found)


def _coarse(obj: str, fine: bool = False) -> str:
    return obj if fine else obj.replace("mixed ", "other ")


def agreement(checker, images: np.ndarray, labels: list[list[str]], idx=None, fine: bool = False) -> dict:
    """Whole-image agreement: the checker's sorted object list equals the label exactly --
    the count, every colour and every shape (incl. `unclear`). Off-palette and two-tone
    count as one colour class (`other`: not a palette colour) unless `fine`."""
    idx = range(len(images)) if idx is None else idx
    wrong = []
    for i in idx:
        found = checker.read(images[i])
        got, want = describe(found, fine), sorted(_coarse(o, fine) for o in labels[i])
        if got != want:
            wrong.append({"index": int(i), "label": want, "checker": got,
                          "shape_probs": [round(f.shape_prob, 3) for f in found]})
    n = len(idx)
    return {"images": n, "agree": n - len(wrong), "accuracy": (n - len(wrong)) / max(1, n), "wrong": wrong}


def score(checker, data: str | Path = DEFAULT_DATA) -> dict:
    """Agreement on the tuning part, the held-back part and all, coarse and fine."""
    images, _, labels = load(data)
    tune, held = split(len(images))
    out = {}
    for name, idx in (("tune", tune), ("held_back", held), ("all", None)):
        out[name] = agreement(checker, images, labels, idx)
        out[name + "_fine"] = {k: v for k, v in agreement(checker, images, labels, idx, fine=True).items()
                               if k != "wrong"}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Make or score the labelled set of generated images.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("--out", default=DEFAULT_DATA)
    mk.add_argument("--model", default="models/toyworld")
    sc = sub.add_parser("score")
    sc.add_argument("--data", default=DEFAULT_DATA)
    sc.add_argument("--checker", default=None)
    sc.add_argument("--write-metrics", action="store_true",
                    help="add the agreement to the checker folder's metrics.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.cmd == "make":
        make(Path(a.out), a.model)
        return
    from mcpl.toyworld.checker import DEFAULT_DIR, Checker

    checker_dir = Path(a.checker or DEFAULT_DIR)
    res = score(Checker.load(checker_dir), a.data)
    if a.write_metrics:
        metrics_file = checker_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        metrics["generated"] = {k: {"agree": v["agree"], "images": v["images"], "accuracy": v["accuracy"]}
                                for k, v in res.items()}
        metrics["generated"]["disagreements"] = res["all"]["wrong"]
        metrics_file.write_text(json.dumps(metrics, indent=1))
    for k, v in res.items():
        print(f"{k}: {v['agree']}/{v['images']} = {v['accuracy']:.3f}")
    for w in res["all"]["wrong"]:
        print(w)


if __name__ == "__main__":
    main()
