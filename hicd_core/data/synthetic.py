"""Synthetic bi-temporal aerial scenes: the built-in dataset (no download).

Each scene is drawn in the look of the LEVIR-CD tiles: soil and dry-grass ground
with multi-scale texture, tree clumps and grass patches, a road or two, and
buildings (rotated rectangles with a two-tone pitched roof and a cast shadow).

Between t1 and t2:

* **labelled change**: buildings built (present only in t2) and demolished
  (present only in t1, their footprint returned to bare soil); the label is the
  union of their footprints;
* **unlabelled pseudo-change** a good model must ignore: a global illumination
  and colour shift, seasonal vegetation (greener or browner, growing or
  shrinking clumps), a small sub-pixel misregistration, and sensor noise.

Every scene is a pure function of ``(seed, index, size)``: sample ``i`` uses the
generator ``numpy.random.default_rng([seed, i])``, so ``synthetic_pairs(n, ...)``
is a prefix of ``synthetic_pairs(n + 1, ...)`` and any sample can be rebuilt
alone.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["synthetic_pairs", "synthetic_pair"]

_ROOF_COLOURS = np.array(
    [[0.45, 0.45, 0.47], [0.55, 0.52, 0.50], [0.62, 0.40, 0.32], [0.82, 0.82, 0.80], [0.35, 0.36, 0.40],
     [0.58, 0.50, 0.40]],
    dtype=np.float32,
)


def _smooth_noise(rng, size, scale):
    """Zero-mean, unit-std noise with correlation length ``scale`` pixels."""
    small = max(2, int(np.ceil(size / scale)) + 2)
    coarse = rng.standard_normal((small, small))
    field = ndimage.zoom(coarse, size / (small - 2), order=3, mode="nearest")[:size, :size]
    field -= field.mean()
    return field / (field.std() + 1e-8)


def _rotated_rect_mask(shape, cy, cx, half_h, half_w, angle, soft=0.7):
    """Anti-aliased mask of a rotated rectangle, plus the signed coordinate across its ridge."""
    H, W = shape
    y0, y1 = int(max(cy - half_h - half_w - 2, 0)), int(min(cy + half_h + half_w + 3, H))
    x0, x1 = int(max(cx - half_h - half_w - 2, 0)), int(min(cx + half_h + half_w + 3, W))
    mask = np.zeros(shape, np.float32)
    ridge = np.zeros(shape, np.float32)
    if y0 >= y1 or x0 >= x1:
        return mask, ridge
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    u = (yy - cy) * c + (xx - cx) * s
    v = -(yy - cy) * s + (xx - cx) * c
    inside_u = np.clip((half_h - np.abs(u)) / soft + 0.5, 0, 1)
    inside_v = np.clip((half_w - np.abs(v)) / soft + 0.5, 0, 1)
    mask[y0:y1, x0:x1] = inside_u * inside_v
    ridge[y0:y1, x0:x1] = u / max(half_h, 1e-3)
    return mask, ridge


class _Building:
    def __init__(self, rng, size, angle):
        scale = size / 128.0
        self.half_h = rng.uniform(4, 10) * scale
        self.half_w = rng.uniform(4, 9) * scale
        self.cy = rng.uniform(self.half_h, size - self.half_h)
        self.cx = rng.uniform(self.half_w, size - self.half_w)
        self.angle = angle + rng.normal(0, 0.08)
        self.colour = _ROOF_COLOURS[rng.integers(len(_ROOF_COLOURS))] * rng.uniform(0.9, 1.1)
        self.shade = rng.uniform(0.78, 0.9)

    def overlaps(self, other, margin):
        r1 = np.hypot(self.half_h, self.half_w)
        r2 = np.hypot(other.half_h, other.half_w)
        return np.hypot(self.cy - other.cy, self.cx - other.cx) < r1 + r2 + margin


def _ground(rng, size):
    """Soil / dry grass with multi-scale texture, vegetation masks for trees and grass."""
    base = np.array([0.55, 0.48, 0.36], np.float32) * rng.uniform(0.85, 1.1, 3).astype(np.float32)
    tex = 0.06 * _smooth_noise(rng, size, size / 3) + 0.04 * _smooth_noise(rng, size, 6) + 0.02 * _smooth_noise(rng, size, 2)
    img = base[:, None, None] * (1.0 + tex[None]).astype(np.float32)
    grass_field = _smooth_noise(rng, size, size / 4)
    tree_field = _smooth_noise(rng, size, max(size / 16, 3)) + 0.6 * _smooth_noise(rng, size, size / 3)
    return img, grass_field, tree_field


def _paint(img, mask, colour):
    img *= 1.0 - mask[None]
    img += mask[None] * colour[:, None, None]


def _render(rng_tex, size, ground, grass_field, tree_field, roads, buildings, season):
    """Draw one epoch of the scene. ``season`` in [-1, 1]: -1 brown / sparse, 1 green / dense."""
    img = ground.copy()
    grass = np.clip((grass_field - 0.2 + 0.3 * season) * 2.0, 0, 1).astype(np.float32)
    grass_colour = np.array([0.42, 0.50, 0.28], np.float32) + np.float32(season) * np.array([-0.05, 0.04, -0.02], np.float32)
    _paint(img, 0.8 * grass, grass_colour)
    for road_mask in roads:
        _paint(img, road_mask, np.array([0.66, 0.64, 0.60], np.float32))
    footprint = np.zeros((size, size), np.float32)
    for b in buildings:
        mask, ridge = _rotated_rect_mask((size, size), b.cy, b.cx, b.half_h, b.half_w, b.angle)
        # cast shadow: the footprint shifted away from the sun (down-right), drawn first
        shift = 0.25 * (b.half_h + b.half_w)
        shadow = ndimage.shift(mask, (shift * 0.6, shift), order=1, mode="constant")
        _paint(img, 0.55 * np.clip(shadow - mask, 0, 1), np.array([0.12, 0.12, 0.14], np.float32))
        img *= 1.0 - mask[None]
        img += mask[None] * _roof_image(b, ridge)
        footprint = np.maximum(footprint, mask)
    trees = np.clip((tree_field - 1.1 + 0.35 * season) * 2.5, 0, 1).astype(np.float32)
    trees *= 1.0 - np.clip(footprint * 3, 0, 1)  # canopy does not cover roofs in these scenes
    tree_colour = np.array([0.16, 0.26, 0.13], np.float32) + np.float32(season) * np.array([-0.02, 0.03, -0.01], np.float32)
    leaf = 1.0 + 0.15 * rng_tex.standard_normal((size, size)).astype(np.float32)
    _paint(img, trees, tree_colour)
    img *= np.where(trees > 0, leaf, 1.0)[None]
    return img


def _roof_image(b, ridge):
    lit = b.colour[:, None, None] * np.ones_like(ridge)[None]
    return np.where(ridge[None] > 0, lit, lit * b.shade).astype(np.float32)


def _roads(rng, size):
    masks, angles = [], []
    for _ in range(rng.integers(0, 3)):
        angle = rng.uniform(0, np.pi)
        width = rng.uniform(2.0, 4.5) * size / 128
        cy, cx = rng.uniform(0, size, 2)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        dist = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
        masks.append(np.clip(width - dist + 0.5, 0, 1).astype(np.float32))
        angles.append(angle)
    return masks, angles


def synthetic_pair(index: int, size: int = 128, seed: int = 0):
    """One synthetic pair: ``t1, t2`` float32 (3, size, size) in [0, 1], ``label`` uint8 (size, size)."""
    rng = np.random.default_rng([seed, index])
    ground, grass_field, tree_field = _ground(rng, size)
    roads, road_angles = _roads(rng, size)
    road_union = np.maximum.reduce(roads) if roads else np.zeros((size, size), np.float32)
    grid_angle = road_angles[0] if road_angles else rng.uniform(0, np.pi / 2)

    def place(count, existing):
        placed = []
        for _ in range(count * 4):
            if len(placed) == count:
                break
            b = _Building(rng, size, grid_angle)
            iy, ix = int(min(b.cy, size - 1)), int(min(b.cx, size - 1))
            if road_union[iy, ix] > 0.1 or any(b.overlaps(o, 2) for o in existing + placed):
                continue
            placed.append(b)
        return placed

    n_buildings = rng.integers(3, 11)
    common = place(int(n_buildings), [])
    demolished = [b for b in common if rng.random() < 0.25]
    kept = [b for b in common if b not in demolished]
    built = place(int(rng.integers(1, 6)), common)
    # vegetation does not grow through buildings of either epoch
    for b in common + built:
        m, _ = _rotated_rect_mask((size, size), b.cy, b.cx, b.half_h + 2, b.half_w + 2, b.angle)
        tree_field -= 4.0 * m

    season1, season2 = rng.uniform(-1, 1, 2)
    t1 = _render(rng, size, ground, grass_field, tree_field, roads, common, season1)
    # the ground under demolished buildings is freshly cleared soil
    t2_ground = ground.copy()
    for b in demolished:
        m, _ = _rotated_rect_mask((size, size), b.cy, b.cx, b.half_h, b.half_w, b.angle)
        _paint(t2_ground, m, np.array([0.62, 0.55, 0.44], np.float32) * np.float32(rng.uniform(0.9, 1.1)))
    t2 = _render(rng, size, t2_ground, grass_field, tree_field, roads, kept + built, season2)

    label = np.zeros((size, size), np.float32)
    for b in demolished + built:
        m, _ = _rotated_rect_mask((size, size), b.cy, b.cx, b.half_h, b.half_w, b.angle)
        label = np.maximum(label, m)
    label = (label >= 0.5).astype(np.uint8)

    # unlabelled pseudo-change on t2: illumination / colour shift, misregistration, noise
    gain = rng.uniform(0.8, 1.2) * rng.uniform(0.93, 1.07, 3)
    offset = rng.uniform(-0.05, 0.05, 3)
    t2 = t2 * gain[:, None, None].astype(np.float32) + offset[:, None, None].astype(np.float32)
    shift = rng.uniform(-0.7, 0.7, 2)
    t2 = ndimage.shift(t2, (0.0, shift[0], shift[1]), order=1, mode="nearest")
    t1 = t1 + rng.normal(0, rng.uniform(0.005, 0.02), t1.shape).astype(np.float32)
    t2 = t2 + rng.normal(0, rng.uniform(0.005, 0.02), t2.shape).astype(np.float32)
    return (np.clip(t1, 0, 1).astype(np.float32), np.clip(t2, 0, 1).astype(np.float32), label)


def synthetic_pairs(n: int, size: int = 128, seed: int = 0):
    """``n`` synthetic pairs.

    Returns
    -------
    t1, t2 : float32 arrays (n, 3, size, size) in [0, 1]
    label : uint8 array (n, size, size) of {0, 1}; 1 = building built or demolished
    """
    if n < 0 or size < 8:
        raise ValueError(f"need n >= 0 and size >= 8, got n={n}, size={size}")
    t1 = np.empty((n, 3, size, size), np.float32)
    t2 = np.empty((n, 3, size, size), np.float32)
    label = np.empty((n, size, size), np.uint8)
    for i in range(n):
        t1[i], t2[i], label[i] = synthetic_pair(i, size, seed)
    return t1, t2, label
