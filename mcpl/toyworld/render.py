"""Seeded renderer of toy scenes: 1-3 coloured shapes with exact masks and a caption.

Scenes are drawn at 64 px with 4x4 supersampling per pixel for clean edges, then
box-downsampled to 32 px (the model's resolution). Colours, shapes, object sizes and
the plain background are chosen so that a colour segmentation can recover each object.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 65, 215),
    "yellow": (235, 200, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
# A Latin square: every colour and every shape is held out exactly once, so each held-out
# pair is a new combination of a seen colour and a seen shape.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "cross"),
    ("blue", "circle"),
    ("yellow", "square"),
)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)

# How far each shape reaches from its centre, in units of its radius (for placement).
EXTENT: dict[str, float] = {"circle": 1.0, "square": 1.16, "triangle": 1.22, "cross": 1.0}
CANVAS = 64  # drawing resolution
SIZE = 32  # output resolution
SUPERSAMPLE = 4


@dataclass
class ObjectSpec:
    """One object: attributes plus geometry in 64-px canvas units."""

    colour: str
    shape: str
    cx: float
    cy: float
    radius: float
    angle: float = 0.0
    rgb: tuple[int, int, int] = (0, 0, 0)


@dataclass
class Scene:
    """A sampled scene; `objects` are in caption order."""

    objects: list[ObjectSpec]
    background: tuple[int, int, int]
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "objects": [asdict(o) for o in self.objects],
            "background": list(self.background),
            "seed": self.seed,
        }


def caption(objects: list[tuple[str, str]] | list[ObjectSpec]) -> str:
    """'a red circle', 'a red circle and a blue square', ... (objects in the given order)."""
    parts = []
    for o in objects:
        c, s = (o.colour, o.shape) if isinstance(o, ObjectSpec) else o
        parts.append(f"a {c} {s}")
    return " and ".join(parts)


def _inside(shape: str, x: np.ndarray, y: np.ndarray, r: float, angle: float) -> np.ndarray:
    """Boolean coverage of a shape centred at the origin (x, y relative coordinates)."""
    ca, sa = np.cos(angle), np.sin(angle)
    u = ca * x + sa * y
    v = -sa * x + ca * y
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        h = r * 0.82
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if shape == "triangle":
        # Equilateral, pointing up (before rotation), centroid at origin; the circumradius
        # is EXTENT["triangle"] * r so its area is close to the other shapes'.
        rt = r * EXTENT["triangle"]
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            th = np.pi / 2 + k * 2 * np.pi / 3 + np.pi  # outward normals of the 3 edges
            nx, ny = np.cos(th), -np.sin(th)
            inside &= (u * nx + v * ny) <= rt * 0.5
        return inside
    if shape == "cross":
        arm = r * 0.36
        return ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))
    raise ValueError(f"unknown shape {shape!r}")


def coverage(obj: ObjectSpec, canvas: int = CANVAS, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Fractional pixel coverage (canvas x canvas, float32 in [0, 1]) of one object."""
    offs = (np.arange(ss) + 0.5) / ss
    grid = np.arange(canvas)[:, None] + offs[None, :]
    g = grid.reshape(-1)
    x = g[None, :] - obj.cx
    y = g[:, None] - obj.cy
    cov = _inside(obj.shape, x, y, obj.radius, obj.angle).astype(np.float32)
    return cov.reshape(canvas, ss, canvas, ss).mean(axis=(1, 3))


def _box_down(a: np.ndarray, factor: int) -> np.ndarray:
    h, w = a.shape[:2]
    return a.reshape(h // factor, factor, w // factor, factor, *a.shape[2:]).mean(axis=(1, 3))


def sample_scene(
    seed: int,
    n_objects: int | None = None,
    pairs: tuple[tuple[str, str], ...] | list[tuple[str, str]] = TRAIN_PAIRS,
    forced: list[tuple[str, str]] | None = None,
) -> Scene:
    """Sample a scene deterministically from `seed`.

    Objects in one scene have distinct colours and distinct shapes, so every caption word
    names exactly one object and same-colour objects never merge in segmentation.
    `forced` fixes the (colour, shape) list (used for evaluation prompts).
    """
    rng = random.Random(seed)
    if forced is not None:
        chosen = list(forced)
    else:
        n = n_objects if n_objects is not None else rng.choice((1, 2, 3))
        for _ in range(1000):
            chosen = rng.sample(list(pairs), n)
            if len({c for c, _ in chosen}) == n and len({s for _, s in chosen}) == n:
                break
        else:  # pragma: no cover - cannot happen with 4x4 pairs
            raise RuntimeError("could not sample distinct objects")
    n = len(chosen)
    rmin, rmax = {1: (12.0, 18.0), 2: (10.0, 14.0), 3: (8.5, 11.5)}[n]
    for _ in range(2000):
        objs = []
        for c, s in chosen:
            r = rng.uniform(rmin, rmax)
            e = r * EXTENT[s]
            cx = rng.uniform(e + 1, CANVAS - e - 1)
            cy = rng.uniform(e + 1, CANVAS - e - 1)
            objs.append((c, s, cx, cy, r, e))
        ok = all(
            np.hypot(a[2] - b[2], a[3] - b[3]) >= a[5] + b[5] + 2.0 for i, a in enumerate(objs) for b in objs[i + 1 :]
        )
        if ok:
            break
    else:  # pragma: no cover
        raise RuntimeError("could not place objects")
    specs = []
    for c, s, cx, cy, r, _ in objs:
        angle = rng.uniform(-0.25, 0.25) if s != "circle" else 0.0
        base = COLOURS[c]
        rgb = tuple(int(np.clip(v + rng.randint(-12, 12), 0, 255)) for v in base)
        specs.append(ObjectSpec(c, s, cx, cy, r, angle, rgb))
    level = rng.randint(205, 245)
    bg = tuple(int(np.clip(level + rng.randint(-8, 8), 0, 255)) for _ in range(3))
    return Scene(specs, bg, seed)


@dataclass
class Rendered:
    """Pixels and per-object masks of a scene."""

    image: np.ndarray  # uint8 HxWx3 at `size`
    masks: list[np.ndarray]  # bool HxW per object at `size` (coverage >= 0.5)
    soft_masks: list[np.ndarray]  # float32 HxW coverage per object at `size`
    scene: Scene

    @property
    def caption(self) -> str:
        return caption(self.scene.objects)


def render(scene: Scene, size: int = SIZE) -> Rendered:
    """Draw the scene at 64 px and box-downsample to `size` (must divide 64)."""
    factor = CANVAS // size
    img = np.empty((CANVAS, CANVAS, 3), np.float32)
    img[:] = np.asarray(scene.background, np.float32)
    rng = np.random.default_rng(scene.seed)
    # Near-plain background: a faint linear gradient.
    gy = np.linspace(-1, 1, CANVAS, dtype=np.float32)[:, None, None]
    img += gy * rng.uniform(-6, 6)
    covs = []
    for obj in scene.objects:
        cov = coverage(obj)
        covs.append(cov)
        img = img * (1 - cov[..., None]) + np.asarray(obj.rgb, np.float32) * cov[..., None]
    # Later objects are drawn on top; visible coverage excludes what is covered later.
    vis = []
    for i, cov in enumerate(covs):
        v = cov.copy()
        for later in covs[i + 1 :]:
            v = v * (1 - later)
        vis.append(v)
    if factor > 1:
        img = _box_down(img, factor)
        vis = [_box_down(v, factor) for v in vis]
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Rendered(image, [v >= 0.5 for v in vis], [v.astype(np.float32) for v in vis], scene)


def bbox(mask: np.ndarray) -> list[int]:
    """[x0, y0, x1, y1] (exclusive end) of a boolean mask; zeros when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
