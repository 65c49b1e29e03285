"""Read a toy-world image and say, per object, its colour and shape.

Colour comes from segmentation against the known palette (no learning needed: colours are
far apart). Shape comes from a tiny CNN that sees one object's soft coverage (alpha) map,
cropped and scaled to 16x16; it is trained only on renderer output, with mild blur/noise
so that it also reads generated images. Train and measure it with

    python -m mcpl.toyworld.checker --out models/toyworld-checker
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mcpl.toyworld.render import ALL_PAIRS, COLOURS, SHAPES, render, sample_scene  # noqa: E402

CROP = 16
PALETTE = np.array([COLOURS[c] for c in COLOURS], np.float32)
COLOUR_NAMES = list(COLOURS)
MIN_PIXELS = 8  # at 32 px; the smallest rendered object covers ~30 px
COLOUR_DIST = 95.0  # max RGB distance from a palette colour for a pixel to belong to it
DEFAULT_DIR = "models/toyworld-checker"


@dataclass
class Found:
    """One detected object."""

    colour: str
    shape: str
    pixels: int
    bbox: list[int]  # x0, y0, x1, y1 (exclusive), in image pixels
    shape_prob: float

    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)


class ShapeNet(torch.nn.Module):
    """Two conv layers + linear on a 1x16x16 alpha crop -> 4 shape logits."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = torch.nn.Linear(32 * 4 * 4, 64)
        self.fc2 = torch.nn.Linear(64, len(SHAPES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _background(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return np.median(border, axis=0)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a small boolean mask (BFS; images are 32x32)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        q = deque([(y0, x0)])
        seen[y0, x0] = True
        while q:
            y, x = q.popleft()
            comp[y, x] = True
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        q.append((ny, nx))
        out.append(comp)
    return out


def _dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def _crop(alpha: np.ndarray, comp: np.ndarray) -> np.ndarray:
    """Square crop around the component's bbox (1 px margin), resized to CROP x CROP."""
    ys, xs = np.nonzero(comp)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    half = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) / 2 + 1
    a = np.where(_dilate(comp, 1), alpha, 0.0).astype(np.float32)
    t = torch.from_numpy(a)[None, None]
    h, w = a.shape
    # Affine grid sampling: maps the square [cx-half, cx+half] to the output.
    lin = (torch.arange(CROP, dtype=torch.float32) + 0.5) / CROP * 2 - 1
    gy = ((cy + lin * half) / h) * 2 - 1
    gx = ((cx + lin * half) / w) * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0].numpy()


def segment(img: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(colour, component mask, 16x16 alpha crop) per object found in an RGB uint8 image."""
    x = img.astype(np.float32)
    bg = _background(x)
    d = np.linalg.norm(x[:, :, None, :] - PALETTE[None, None], axis=-1)  # H,W,C
    nearest = d.argmin(-1)
    close = d.min(-1) <= COLOUR_DIST
    out = []
    for ci, name in enumerate(COLOUR_NAMES):
        col = PALETTE[ci]
        v = col - bg
        alpha = np.clip(((x - bg) @ v) / (v @ v + 1e-6), 0.0, 1.0)
        for comp in _components(close & (nearest == ci)):
            if comp.sum() >= MIN_PIXELS:
                out.append((name, comp, _crop(alpha, comp)))
    return out


class Checker:
    """Colour segmentation + ShapeNet; `read(image)` lists the objects it sees."""

    def __init__(self, net: ShapeNet | None = None) -> None:
        self.net = (net or ShapeNet()).eval()

    @classmethod
    def load(cls, path: str | Path = DEFAULT_DIR) -> Checker:
        net = ShapeNet()
        net.load_state_dict(load_file(str(Path(path) / "shape_net.safetensors")))
        return cls(net)

    def save(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.net.state_dict().items()},
            str(Path(path) / "shape_net.safetensors"),
        )

    @torch.no_grad()
    def read(self, image) -> list[Found]:
        """Objects in a PIL image or HxWx3 uint8 array (resized to 32 px if needed)."""
        img = _as_array(image)
        segs = segment(img)
        if not segs:
            return []
        crops = torch.from_numpy(np.stack([c for _, _, c in segs]))[:, None]
        probs = self.net(crops).softmax(-1)
        found = []
        for (colour, comp, _), p in zip(segs, probs, strict=True):
            ys, xs = np.nonzero(comp)
            k = int(p.argmax())
            found.append(
                Found(
                    colour,
                    SHAPES[k],
                    int(comp.sum()),
                    [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                    float(p[k]),
                )
            )
        return found


def _as_array(image) -> np.ndarray:
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.size != (32, 32):
            image = image.convert("RGB").resize((32, 32), Image.BOX)
        return np.asarray(image.convert("RGB"))
    return np.asarray(image)[..., :3]


def matches(found: list[Found], expected: list[tuple[str, str]]) -> bool:
    """Whole-image check: exactly the expected multiset of (colour, shape), nothing more."""
    return sorted(f.pair() for f in found) == sorted(expected)


# ----------------------------------------------------------------------------- training


def _augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild blur, colour shift and noise, like a VAE decode of a generated image."""
    x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None]
    s = rng.uniform(0.0, 0.8)
    if s > 0.15:
        k = torch.arange(-2, 3, dtype=torch.float32)
        w = torch.exp(-(k**2) / (2 * s * s))
        w = w / w.sum()
        x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), w.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
        x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), w.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)
    x = x[0].permute(1, 2, 0).numpy()
    x = x + rng.normal(0, rng.uniform(0, 6), x.shape) + rng.uniform(-10, 10, (1, 1, 3))
    return np.clip(x, 0, 255).astype(np.uint8)


def make_examples(seeds: range, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Alpha crops and shape labels of every object the segmenter recovers."""
    xs, ys = [], []
    for seed in seeds:
        r = render(sample_scene(seed, pairs=ALL_PAIRS))
        img = _augment(r.image, np.random.default_rng(seed)) if augment else r.image
        for colour, comp, crop in segment(img):
            # Label by the rendered object whose mask overlaps this component most.
            overlaps = [(m & comp).sum() for m in r.masks]
            k = int(np.argmax(overlaps))
            if overlaps[k] == 0 or r.scene.objects[k].colour != colour:
                continue
            xs.append(crop)
            ys.append(SHAPES.index(r.scene.objects[k].shape))
    return torch.from_numpy(np.stack(xs))[:, None], torch.tensor(ys)


def train(n_scenes: int = 6000, epochs: int = 15, seed: int = 0) -> Checker:
    torch.manual_seed(seed)
    x, y = make_examples(range(1_000_000, 1_000_000 + n_scenes), augment=True)
    x2, y2 = make_examples(range(2_000_000, 2_000_000 + n_scenes // 3), augment=False)
    x, y = torch.cat([x, x2]), torch.cat([y, y2])
    net = ShapeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 127, 128):
            b = perm[i : i + 128]
            xb = x[b]
            flip = torch.rand(len(b), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(net(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return Checker(net)


def evaluate(checker: Checker, seeds: range, augment: bool = False) -> dict:
    """Object-level colour/shape accuracy and whole-scene accuracy on fresh renders."""
    n_obj = colour_ok = shape_ok = scene_ok = 0
    for seed in seeds:
        r = render(sample_scene(seed, pairs=ALL_PAIRS))
        img = _augment(r.image, np.random.default_rng(seed)) if augment else r.image
        found = checker.read(img)
        expected = [(o.colour, o.shape) for o in r.scene.objects]
        scene_ok += matches(found, expected)
        for o, m in zip(r.scene.objects, r.masks, strict=True):
            n_obj += 1
            best = max(found, key=lambda f: _bbox_overlap(f.bbox, m), default=None)
            if best is not None and _bbox_overlap(best.bbox, m) > 0:
                colour_ok += best.colour == o.colour
                shape_ok += best.shape == o.shape and best.colour == o.colour
    return {
        "scenes": len(seeds),
        "objects": n_obj,
        "colour_acc": colour_ok / n_obj,
        "shape_acc": shape_ok / n_obj,
        "scene_acc": scene_ok / len(seeds),
    }


def _bbox_overlap(bbox: list[int], mask: np.ndarray) -> int:
    x0, y0, x1, y1 = bbox
    return int(mask[y0:y1, x0:x1].sum())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train and measure the toy-world checker.")
    ap.add_argument("--out", default=DEFAULT_DIR)
    ap.add_argument("--scenes", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--eval-scenes", type=int, default=2000)
    ap.add_argument("--eval-only", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    checker = Checker.load(args.out) if args.eval_only else train(args.scenes, args.epochs)
    if not args.eval_only:
        checker.save(args.out)
    ev = range(3_000_000, 3_000_000 + args.eval_scenes)
    metrics = {
        "clean": evaluate(checker, ev),
        "augmented": evaluate(checker, ev, augment=True),
        "train_scenes": args.scenes,
        "epochs": args.epochs,
        "seconds": round(time.time() - t0, 1),
    }
    (Path(args.out) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
