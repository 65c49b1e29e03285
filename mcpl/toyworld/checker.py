"""Read a toy-world image and say, per object, its colour and shape.

Segmentation needs no learning: pixels far from the (border) background colour are
foreground; 8-connected foreground components are objects, split where two palette colours
meet with a sharp edge (two touching objects) or where a same-colour component falls apart
after one erosion (two objects touching at a corner). Colour: the hue of the object's median
core colour, in the hue band of a palette colour (the bands hold every colour the renderer
draws, with its jitter) -- else `other` (off the palette: orange, purple, teal, brown...);
an object whose interior holds two distinct colours is `mixed` (two-tone). It is never split
into two objects. Shape: a small CNN on the object's soft coverage (alpha) map, cropped and
scaled to 16x16, with a fifth class for shapes that are none of the four (trained on
renders and on `oddshapes`: deformed and irregular objects); it says `unclear` for that
class. Round blobs (a circle or square template fits them well) are told apart by the
four-fold harmonic of their outline instead -- generated circles and squares meet in
"squircles", and there the harmonic is steadier than the net. Train and measure it with

    python -m mcpl.toyworld.checker --out models/toyworld-checker
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
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
OFF_PALETTE = "other"  # one colour, but not a palette colour
TWO_TONE = "mixed"  # two distinct colours inside one object
UNCLEAR = "unclear"  # a shape that is none of SHAPES (or the net is unsure)
SHAPE_CLASSES = (*SHAPES, UNCLEAR)
MIN_PIXELS = 8  # at 32 px; the smallest rendered object covers ~30 px
FG_DIST = 80.0  # RGB distance from the background for a foreground pixel (~ coverage 0.4)
# Hue bands (degrees) of the palette colours. Each holds every hue the renderer draws for
# that colour (palette +-12 per channel: red up to 8.2, yellow from 43.1, green 118-146,
# blue 219-238) with a small margin; hues between bands are off the palette.
HUE_BANDS = {"red": (-15.0, 9.0), "yellow": (42.5, 70.0), "green": (95.0, 155.0), "blue": (212.0, 255.0)}
SPLIT_OFF = 0.12  # at most this share of off-band pixels where two palette colours touch, to split them
MIN_PART = 20  # pixels of each palette-colour region for such a split
ERODE_PART = 12  # pixels of each piece left by one erosion, to split a same-colour component
TWO_TONE_DIST = 40.0  # interior pixels this far (RGB) from the interior median are another colour
TWO_TONE_SHARE = 0.10  # ... and this share of them makes the object two-tone
UNCLEAR_P = 0.5  # the net's probability of its unclear class from which the shape is unclear
ROUND_FIT = 0.9  # soft IoU of the best circle or square template from which a blob is round
SQUARENESS = 0.055  # four-fold outline harmonic (render circles <= 0.014, squares >= 0.105)
DEFAULT_DIR = "models/toyworld-checker"


@dataclass
class Found:
    """One detected object."""

    colour: str  # a palette colour, OFF_PALETTE or TWO_TONE
    shape: str  # one of SHAPES or UNCLEAR
    pixels: int
    bbox: list[int]  # x0, y0, x1, y1 (exclusive), in image pixels
    shape_prob: float  # the net's probability of `shape`
    rgb: tuple[int, int, int] = (0, 0, 0)  # median colour of the object's core pixels
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)  # bool HxW

    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass
class Blob:
    """One segmented object before the shape net: colour, pixels and its alpha crop."""

    colour: str
    mask: np.ndarray
    crop: np.ndarray
    rgb: np.ndarray
    hue: float
    two_tone_share: float
    alpha: np.ndarray  # soft coverage of this object alone (HxW, 0 elsewhere)


class ShapeNet(torch.nn.Module):
    """Two conv layers + linear on a 1x16x16 alpha crop -> 5 logits (SHAPES + unclear)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = torch.nn.Linear(32 * 4 * 4, 64)
        self.fc2 = torch.nn.Linear(64, len(SHAPE_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _background(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return np.median(border, axis=0)


def hue_of(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees of (..., 3) RGB values."""
    rgb = np.asarray(rgb, np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = mx - mn + 1e-9
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return h * 60.0


def hue_colour(hue: np.ndarray) -> np.ndarray:
    """Index into COLOUR_NAMES of the hue band each hue falls in, -1 between bands."""
    h = np.where(hue >= 345.0, hue - 360.0, hue)
    out = np.full(np.shape(h), -1)
    for k, name in enumerate(COLOUR_NAMES):
        lo, hi = HUE_BANDS[name]
        out[(h >= lo) & (h < hi)] = k
    return out


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
    p = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= p[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    out = mask.copy()
    for dy in range(3):
        for dx in range(3):
            out &= p[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def _grow(seeds: list[np.ndarray], within: np.ndarray) -> list[np.ndarray]:
    """Split `within` among `seeds` (disjoint masks inside it) by 8-connected BFS from them."""
    lab = np.full(within.shape, -1)
    for j, s in enumerate(seeds):
        lab[s] = j
    h, w = lab.shape
    q = deque(zip(*np.nonzero(lab >= 0), strict=True))
    while q:
        y, x = q.popleft()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and within[ny, nx] and lab[ny, nx] < 0:
                    lab[ny, nx] = lab[y, x]
                    q.append((ny, nx))
    return [lab == j for j in range(len(seeds))]


def _split(comp: np.ndarray, band: np.ndarray) -> list[np.ndarray]:
    """Objects in one foreground component.

    Two palette-colour regions with few off-band pixels between them are two touching
    objects (a two-tone object blends its colours: many off-band pixels). A single-colour
    part that one erosion cuts into large pieces is two objects touching at a corner.
    """
    regions = [r for k in range(len(COLOUR_NAMES)) for r in _components(comp & (band == k)) if r.sum() >= MIN_PART]
    parts = [comp]
    if len(regions) >= 2 and (band[comp] < 0).mean() <= SPLIT_OFF:
        parts = _grow(regions, comp)
    out = []
    for part in parts:
        pieces = [c for c in _components(_erode(part)) if c.sum() >= ERODE_PART]
        out.extend(_grow(pieces, part) if len(pieces) >= 2 else [part])
    return out


def _colour(x: np.ndarray, d: np.ndarray, part: np.ndarray) -> tuple[str, np.ndarray, float, float]:
    """(colour name, median core RGB, its hue, two-tone share) of one object."""
    dp = d[part]
    core = part & (d >= max(100.0, 0.6 * np.percentile(dp, 90)))
    if core.sum() < 4:
        core = part
    rgb = np.median(x[core], axis=0)
    hue = float(hue_of(rgb))
    inner = _erode(part) & (d >= 0.5 * np.percentile(dp, 90))
    share = 0.0
    if inner.sum() >= 6:
        px = x[inner]
        share = float((np.linalg.norm(px - np.median(px, axis=0), axis=-1) > TWO_TONE_DIST).mean())
    k = int(hue_colour(np.array(hue)))
    if share >= TWO_TONE_SHARE:
        name = TWO_TONE
    elif k < 0:
        name = OFF_PALETTE
    else:
        name = COLOUR_NAMES[k]
    return name, rgb, hue, share


def _crop(alpha: np.ndarray, comp: np.ndarray) -> np.ndarray:
    """Square crop around the component's bbox (1 px margin), resized to CROP x CROP."""
    ys, xs = np.nonzero(comp)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    half = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) / 2 + 1
    t = torch.from_numpy(alpha.astype(np.float32))[None, None]
    h, w = alpha.shape
    # Affine grid sampling: maps the square [cx-half, cx+half] to the output.
    lin = (torch.arange(CROP, dtype=torch.float32) + 0.5) / CROP * 2 - 1
    gy = ((cy + lin * half) / h) * 2 - 1
    gx = ((cx + lin * half) / w) * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0].numpy()


def segment(img: np.ndarray) -> list[Blob]:
    """Every object in an RGB uint8 image: colour, mask and 16x16 alpha crop."""
    x = img.astype(np.float32)
    bg = _background(x)
    d = np.linalg.norm(x - bg, axis=-1)
    band = hue_colour(hue_of(x))
    parts = [p for comp in _components(d >= FG_DIST) if comp.sum() >= MIN_PIXELS for p in _split(comp, band)]
    parts = [p for p in parts if p.sum() >= MIN_PIXELS]
    blobs = []
    for i, part in enumerate(parts):
        name, rgb, hue, share = _colour(x, d, part)
        v = rgb - bg
        alpha = np.clip(((x - bg) @ v) / (v @ v + 1e-6), 0.0, 1.0)
        others = np.zeros_like(part)
        for j, p in enumerate(parts):
            if j != i:
                others |= p
        keep = _dilate(part, 1) & ~others
        alpha = np.where(keep, alpha, 0.0)
        blobs.append(Blob(name, part, _crop(alpha, part), rgb, hue, share, alpha))
    return blobs


def outline_harmonics(alpha: np.ndarray, n: int = 64) -> np.ndarray:
    """Amplitudes of harmonics 1-5 of the outline radius r(theta) around the centroid,
    relative to the mean radius (where the soft coverage along a ray first drops below 0.5).
    Harmonic 4 measures squareness: 0 for a circle, ~0.13 for a square."""
    a = alpha.astype(np.float32)
    total = a.sum()
    ys, xs = np.mgrid[0 : a.shape[0], 0 : a.shape[1]]
    cy, cx = (a * ys).sum() / total, (a * xs).sum() / total
    th = np.linspace(0, 2 * np.pi, n, endpoint=False)
    t = np.arange(0, a.shape[0] / 2, 0.05)
    py, px = cy + np.sin(th)[:, None] * t, cx + np.cos(th)[:, None] * t
    grid = torch.from_numpy(np.stack([px / (a.shape[1] - 1) * 2 - 1, py / (a.shape[0] - 1) * 2 - 1], -1)).float()
    v = F.grid_sample(torch.from_numpy(a)[None, None], grid[None], align_corners=True)[0, 0].numpy()
    below = v < 0.5
    r = np.where(below.any(1), t[np.argmax(below, axis=1)], t[-1])
    c = np.fft.rfft(r) / n
    return np.abs(c[1:6]) * 2 / max(float(np.abs(c[0])), 1e-6)


_SS = 4  # supersampling of the templates
_UNIT_AREA: dict[str, float] = {}


def template_fit(alpha: np.ndarray, shapes: tuple[str, ...] = ("circle", "square")) -> dict[str, float]:
    """Best soft IoU of each shape's template with the object: centred on its centroid,
    scaled to its area, over rotations (7.5 degree steps) and a 1.2x stretch."""
    from mcpl.toyworld.render import _inside

    a = alpha.astype(np.float64)
    area = a.sum()
    h, w = a.shape
    ys, xs = np.mgrid[0:h, 0:w]
    cy, cx = (a * (ys + 0.5)).sum() / area, (a * (xs + 0.5)).sum() / area
    off = (np.arange(_SS) + 0.5) / _SS
    gy = (np.arange(h)[:, None] + off[None, :]).reshape(-1) - cy
    gx = (np.arange(w)[:, None] + off[None, :]).reshape(-1) - cx
    X, Y = np.meshgrid(gx, gy)
    out = {}
    for shape in shapes:
        if shape not in _UNIT_AREA:
            g = np.linspace(-2, 2, 801)
            _UNIT_AREA[shape] = float(_inside(shape, *np.meshgrid(g, g), 1.0, 0.0).mean() * 16)
        symmetry = {"circle": 1, "square": 90, "triangle": 120, "cross": 90}[shape]
        best = 0.0
        for stretch in (1.0, 1.2):
            r = np.sqrt(area / (_UNIT_AREA[shape] * stretch))
            for deg in np.arange(0, max(symmetry, 1), 7.5) if symmetry > 1 else (0.0,):
                c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
                u, v = c * X + s * Y, -s * X + c * Y
                t = _inside(shape, u / stretch, v, r, 0.0).reshape(h, _SS, w, _SS).mean(axis=(1, 3))
                best = max(best, float(np.minimum(a, t).sum() / np.maximum(a, t).sum()))
        out[shape] = best
    return out


def decide_shape(probs: np.ndarray, alpha: np.ndarray, unclear_p: float = UNCLEAR_P) -> tuple[str, float]:
    """(shape, its probability) from the net's 5 probabilities and the object's alpha map.

    A round blob (not a triangle or cross to the net, and a circle or square template fits
    it with IoU >= ROUND_FIT) is a circle or a square by its outline's four-fold harmonic.
    Otherwise the net decides: unclear when its unclear class has >= unclear_p, else its
    best of the four shapes.
    """
    tri, cross = SHAPES.index("triangle"), SHAPES.index("cross")
    if probs[tri] + probs[cross] < 0.5 and max(template_fit(alpha).values()) >= ROUND_FIT:
        shape = "circle" if outline_harmonics(alpha)[3] < SQUARENESS else "square"
        return shape, float(probs[SHAPES.index(shape)])
    if probs[-1] >= unclear_p:
        return UNCLEAR, float(probs[-1])
    k = int(np.argmax(probs[: len(SHAPES)]))
    return SHAPES[k], float(probs[k])


class Checker:
    """Segmentation + ShapeNet; `read(image)` lists the objects it sees."""

    def __init__(self, net: ShapeNet | None = None, unclear_p: float = UNCLEAR_P) -> None:
        self.net = (net or ShapeNet()).eval()
        self.unclear_p = unclear_p

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
    def shape_probs(self, crops: np.ndarray) -> torch.Tensor:
        return self.net(torch.from_numpy(np.asarray(crops, np.float32))[:, None]).softmax(-1)

    @torch.no_grad()
    def read(self, image) -> list[Found]:
        """Objects in a PIL image or HxWx3 uint8 array (resized to 32 px if needed)."""
        img = _as_array(image)
        blobs = segment(img)
        if not blobs:
            return []
        probs = self.shape_probs(np.stack([b.crop for b in blobs]))
        found = []
        for blob, p in zip(blobs, probs.numpy(), strict=True):
            ys, xs = np.nonzero(blob.mask)
            shape, prob = decide_shape(p, blob.alpha, self.unclear_p)
            found.append(
                Found(
                    blob.colour,
                    shape,
                    int(blob.mask.sum()),
                    [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                    prob,
                    tuple(int(round(c)) for c in blob.rgb),
                    blob.mask,
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


def _label_blobs(img: np.ndarray, masks: list[np.ndarray], labels: list[int]) -> tuple[list, list]:
    """Crops of the segmented blobs, each labelled as the drawn object it overlaps most
    (skipped when it overlaps none, or covers under half of that object)."""
    xs, ys = [], []
    for blob in segment(img):
        overlaps = [(m & blob.mask).sum() for m in masks]
        k = int(np.argmax(overlaps))
        if overlaps[k] == 0 or overlaps[k] < 0.5 * masks[k].sum():
            continue
        xs.append(blob.crop)
        ys.append(labels[k])
    return xs, ys


def make_examples(seeds: range, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Alpha crops and shape labels of every object the segmenter recovers in renders."""
    xs, ys = [], []
    for seed in seeds:
        r = render(sample_scene(seed, pairs=ALL_PAIRS))
        img = _augment(r.image, np.random.default_rng(seed)) if augment else r.image
        x, y = _label_blobs(img, r.masks, [SHAPES.index(o.shape) for o in r.scene.objects])
        xs += x
        ys += y
    return torch.from_numpy(np.stack(xs))[:, None], torch.tensor(ys)


def make_odd_examples(seeds: range, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from `oddshapes` scenes: deformed shapes keep their class, irregular ones are unclear."""
    from mcpl.toyworld.oddshapes import odd_scene

    xs, ys = [], []
    for seed in seeds:
        img, objs, masks = odd_scene(seed)
        img = _augment(img, np.random.default_rng(seed)) if augment else img
        x, y = _label_blobs(img, masks, [o.label for o in objs])
        xs += x
        ys += y
    return torch.from_numpy(np.stack(xs))[:, None], torch.tensor(ys)


def train(n_scenes: int = 6000, epochs: int = 15, seed: int = 0, n_odd: int = 8000) -> Checker:
    """Shape net on renders (augmented + clean) and `oddshapes` scenes (augmented)."""
    torch.manual_seed(seed)
    parts = [
        make_examples(range(1_000_000, 1_000_000 + n_scenes), augment=True),
        make_examples(range(2_000_000, 2_000_000 + n_scenes // 3), augment=False),
    ]
    if n_odd:
        parts.append(make_odd_examples(range(5_000_000, 5_000_000 + n_odd)))
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
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
    ap.add_argument("--odd-scenes", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--eval-scenes", type=int, default=2000)
    ap.add_argument("--eval-only", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    checker = Checker.load(args.out) if args.eval_only else train(args.scenes, args.epochs, n_odd=args.odd_scenes)
    if not args.eval_only:
        checker.save(args.out)
    ev = range(3_000_000, 3_000_000 + args.eval_scenes)
    metrics = {
        "clean": evaluate(checker, ev),
        "augmented": evaluate(checker, ev, augment=True),
        "train_scenes": args.scenes,
        "odd_scenes": args.odd_scenes,
        "epochs": args.epochs,
        "decision": {"unclear_p": checker.unclear_p, "round_fit": ROUND_FIT, "squareness": SQUARENESS,
                     "hue_bands": HUE_BANDS, "two_tone": [TWO_TONE_DIST, TWO_TONE_SHARE]},
    }
    metrics["seconds"] = round(time.time() - t0, 1)
    (Path(args.out) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    print("accuracy on generated images: python -m mcpl.toyworld.labelset score --write-metrics")


if __name__ == "__main__":
    main()
