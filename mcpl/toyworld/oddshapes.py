"""Deformed and irregular objects, drawn like the renderer draws, to train the checker's shape net.

Generated images are not renders: the model draws rounded squares, lumpy crosses, squircles
between a circle and a square, trapezoids, stars, two shapes fused into one blob, and
colours off the palette. The checker must name a recognisably deformed shape by its class
and call the rest `unclear`. This module draws both kinds on the renderer's canvas (64 px,
supersampled, box-downsampled to 32 px):

- regular shapes with mild deformations: smoothed corners, low-frequency lumps, a little
  stretch, squares with rounded corners (superellipse exponent >= 4.2);
- irregular shapes (the `unclear` class), only mildly deformed: squircles (exponent 2.6-3.4), trapezoids, houses
  (a square with a roof), stars, arches, lumpy blobs, two fused shapes, notched squares.

Colours: palette colours with the renderer's jitter, or off-palette hues (orange, purple,
teal, brown, ...), so the shape crops of `other` blobs are learned too.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mcpl.toyworld.render import CANVAS, COLOURS, SHAPES, SIZE, _inside

FINE = 4  # supersampling of the fine grid (as the renderer)
IRREGULAR = ("squircle", "trapezoid", "house", "star", "arch", "blob", "fused", "notched")
UNCLEAR_INDEX = len(SHAPES)  # class index of "unclear" in the shape net


@dataclass
class OddObject:
    kind: str  # a shape of SHAPES or one of IRREGULAR
    label: int  # 0..3 = SHAPES, 4 = unclear
    cx: float
    cy: float
    radius: float
    rgb: tuple[int, int, int]


def _grid(cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
    n = CANVAS * FINE
    g = (np.arange(n) + 0.5) / FINE
    return g[None, :] - cx, g[:, None] - cy


def _rot(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    ca, sa = math.cos(angle), math.sin(angle)
    return ca * x + sa * y, -sa * x + ca * y


def _regular(shape: str, u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    if shape == "square" and rng.random() < 0.5:
        p = rng.uniform(4.2, 30)
        h = r * 0.86
        return (np.abs(u) / h) ** p + (np.abs(v) / h) ** p <= 1
    return _inside(shape, u, v, r, 0.0)


def _irregular(kind: str, u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    if kind == "squircle":
        p, h = rng.uniform(2.6, 3.4), r * rng.uniform(0.88, 0.98)
        return (np.abs(u) / h) ** p + (np.abs(v) / h) ** p <= 1
    if kind == "trapezoid":
        h, a = r * 0.85, rng.uniform(0.3, 0.65)  # top edge a * bottom edge (v grows downwards)
        half = h * (a + (1 - a) * np.clip((v + h) / (2 * h), 0, 1))
        return (np.abs(v) <= h) & (np.abs(u) <= half)
    if kind == "house":
        h = r * 0.72
        roof = rng.uniform(0.5, 1.0) * h
        body = (np.abs(u) <= h) & (v >= -h * 0.2) & (v <= h)
        top = (v < -h * 0.2) & (v >= -h * 0.2 - roof * 1.4) & (np.abs(u) <= h * (1 - (-h * 0.2 - v) / (roof * 1.4)))
        return body | top
    if kind == "star":
        k = int(rng.choice([5, 6]))
        th = np.arctan2(v, u)
        rad = r * (0.74 + rng.uniform(0.22, 0.32) * np.cos(k * th + rng.uniform(0, 2 * np.pi)))
        return np.hypot(u, v) <= rad
    if kind == "arch":
        h = r * 0.78
        return ((np.abs(u) <= h) & (v >= 0) & (v <= h)) | ((np.hypot(u, v) <= h) & (v < 0))
    if kind == "blob":
        th = np.arctan2(v, u)
        rad = np.full_like(th, 0.85 * r)
        for k in (2, 3, 4):
            rad = rad + r * rng.uniform(0.07, 0.18) * np.cos(k * th + rng.uniform(0, 2 * np.pi))
        return np.hypot(u, v) <= rad
    if kind == "fused":
        a, b = rng.choice(len(SHAPES), 2, replace=False)  # two equal shapes would fuse into an oval or a bar
        off = r * rng.uniform(0.55, 0.85)
        ang = rng.uniform(0, 2 * np.pi)
        dx, dy = off * math.cos(ang), off * math.sin(ang)
        r2 = r * 0.68
        return _inside(SHAPES[a], u - dx / 2, v - dy / 2, r2, 0.0) | _inside(SHAPES[b], u + dx / 2, v + dy / 2, r2, 0.0)
    if kind == "notched":
        h = r * 0.82
        sq = (np.abs(u) <= h) & (np.abs(v) <= h)
        q = rng.uniform(0.35, 0.6) * h
        sx, sy = rng.choice([-1, 1]), rng.choice([-1, 1])
        cut = (sx * u >= h - 2 * q) & (sy * v >= h - 2 * q)
        if rng.random() < 0.5:
            return sq & ~cut
        bump = np.hypot(u - sx * h, v - sy * rng.uniform(-0.5, 0.5) * h) <= q * 1.2
        return sq | bump
    raise ValueError(kind)


def _deform(fine: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Round corners (blur + re-threshold) and add low-frequency lumps."""
    t = torch.from_numpy(fine.astype(np.float32))[None, None]
    sigma = rng.uniform(0, 1.6 * strength) * FINE
    if sigma > 0.5:
        k = torch.arange(-int(3 * sigma), int(3 * sigma) + 1, dtype=torch.float32)
        w = torch.exp(-(k**2) / (2 * sigma**2))
        w = (w / w.sum())
        t = F.conv2d(F.pad(t, (len(k) // 2, len(k) // 2, 0, 0)), w.view(1, 1, 1, -1))
        t = F.conv2d(F.pad(t, (0, 0, len(k) // 2, len(k) // 2)), w.view(1, 1, -1, 1))
    amp = rng.uniform(0, 0.25 * strength)
    if amp > 0.01:
        noise = torch.from_numpy(rng.standard_normal((1, 1, 6, 6)).astype(np.float32))
        t = t + amp * F.interpolate(noise, size=fine.shape, mode="bicubic", align_corners=False)
    # Lumps only near the shape: never a stray piece elsewhere on the canvas.
    coarse = F.max_pool2d(torch.from_numpy(fine.astype(np.float32))[None, None], FINE)  # canvas grid
    near = F.interpolate(F.max_pool2d(coarse, 7, 1, 3), scale_factor=FINE, mode="nearest")
    return ((t >= 0.5) & (near > 0))[0, 0].numpy()


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.7:
        base = list(COLOURS.values())[int(rng.integers(len(COLOURS)))]
        return tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in base)
    h, s, v = rng.uniform(0, 1), rng.uniform(0.55, 0.95), rng.uniform(0.45, 0.95)
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))


def odd_scene(seed: int, p_irregular: float = 0.35) -> tuple[np.ndarray, list[OddObject], list[np.ndarray]]:
    """A 32 px image of 1-3 (possibly deformed or irregular) objects, their specs and masks."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([1, 1, 2, 3]))
    rmin, rmax = {1: (11.0, 18.0), 2: (10.0, 14.0), 3: (8.5, 11.5)}[n]
    for _ in range(500):
        objs = []
        for _ in range(n):
            r = rng.uniform(rmin, rmax)
            e = r * 1.25
            objs.append((r, rng.uniform(e + 1, CANVAS - e - 1), rng.uniform(e + 1, CANVAS - e - 1), e))
        pairs = [(a, b) for i, a in enumerate(objs) for b in objs[i + 1 :]]
        if all(math.hypot(a[1] - b[1], a[2] - b[2]) >= a[3] + b[3] + 3 for a, b in pairs):
            break
    level = rng.integers(205, 246)
    bg = np.array([level + rng.integers(-8, 9) for _ in range(3)], np.float32)
    img = np.empty((CANVAS, CANVAS, 3), np.float32)
    img[:] = bg
    img += np.linspace(-1, 1, CANVAS, dtype=np.float32)[:, None, None] * rng.uniform(-6, 6)
    specs, covs = [], []
    for r, cx, cy, _ in objs:
        irregular = rng.random() < p_irregular
        kind = IRREGULAR[int(rng.integers(len(IRREGULAR)))] if irregular else SHAPES[int(rng.integers(len(SHAPES)))]
        x, y = _grid(cx, cy)
        u, v = _rot(x, y, rng.uniform(-0.35, 0.35) if kind != "circle" else 0.0)
        if not irregular and kind in ("circle", "square") and rng.random() < 0.4:
            u = u / rng.uniform(0.82, 1.0)  # a little stretch
        if irregular:
            fine = _irregular(kind, u, v, r, rng)
        else:
            fine = _regular(kind, u, v, r, rng)
        fine = _deform(fine, rng, rng.choice([0.0, 0.3, 0.6]) if irregular else rng.choice([0.0, 0.5, 1.0, 1.3]))
        cov = fine.reshape(CANVAS, FINE, CANVAS, FINE).mean(axis=(1, 3)).astype(np.float32)
        rgb = _colour(rng)
        img = img * (1 - cov[..., None]) + np.asarray(rgb, np.float32) * cov[..., None]
        covs.append(cov)
        specs.append(OddObject(kind, UNCLEAR_INDEX if irregular else SHAPES.index(kind), cx, cy, r, rgb))
    f = CANVAS // SIZE
    img = img.reshape(SIZE, f, SIZE, f, 3).mean(axis=(1, 3))
    masks = [c.reshape(SIZE, f, SIZE, f).mean(axis=(1, 3)) >= 0.5 for c in covs]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), specs, masks
