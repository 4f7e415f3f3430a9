"""Findings of the lungs, airways and pleura (11 of the 18 labels).

Each finding has `draw_*(rng, anatomy) -> params` and either `paint_*(canvas, anatomy,
params)` or `modify_*(anatomy, params) -> anatomy`; see `abnormalities` for the registry.
Lung findings are painted only on lung parenchyma (the "parenchyma" mask: lung-shaped
voxels that are not heart, vessel or bronchial wall) or, where they replace whole lung
(effusion, bronchiectasis), on the lung shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_pipeline.synthetic.anatomy import Anatomy, lobe_of, lung_shape, protected_mask
from data_pipeline.synthetic.canvas import (
    Canvas, ellipsoid_box, ellipsoid_radius2, lattice_field, paint_ellipsoid, paint_polyline,
    unit_vector)

Params = dict[str, Any]

_SIDES = {"right": (-1,), "left": (1,), "bilateral": (-1, 1)}
_LOWER_LOBES = {"right": "right lower lobe", "left": "left lower lobe",
                "bilateral": "lower lobes of both lungs"}


def _choose_side(rng, p_right: float, p_left: float) -> str:
    value = rng.random()
    return "right" if value < p_right else "left" if value < p_right + p_left else "bilateral"


def _side_mask(canvas: Canvas, anat: Anatomy, side: str) -> np.ndarray:
    """(1, W, 1) bool: the columns of the chosen side(s) of the patient."""
    right = canvas.x < anat.x0
    return {"right": right, "left": ~right, "bilateral": np.ones_like(right)}[side]


def sample_lung_points(rng, anat: Anatomy, n: int, margin_mm: float, *, side: str = "bilateral",
                       u_range=(0.05, 0.95), anterior: bool = False) -> np.ndarray:
    """`n` points (y, x, z) inside the lungs, at least `margin_mm` from their edges and
    clear of an enlarged heart.  `u_range` limits the height (0 base, 1 apex).  Uses a
    fixed number of random draws so the stream does not depend on the anatomy."""
    count = 512
    y = rng.uniform(anat.cav_front, anat.cav_yc + anat.cav_b, count)
    if anterior:
        y = anat.cav_front + 0.5 * (y - anat.cav_front)
    signs = np.array(_SIDES[side])[rng.integers(len(_SIDES[side]), size=count)]
    x = anat.x0 + signs * rng.uniform(anat.med_hw, anat.cav_a, count)
    z = anat.z_base + rng.uniform(*u_range, count) * (anat.z_apex - anat.z_base)
    ok = lung_shape(anat, y, x, z)
    for axis in range(3):
        for sign in (-1, 1):
            shifted = [y, x, z]
            shifted[axis] = shifted[axis] + sign * margin_mm
            ok &= lung_shape(anat, *shifted)
    heart = anat.heart
    ok &= ellipsoid_radius2((y, x, z), heart.centre, heart.semi_axes * 1.6, heart.angle_xy) > 1
    points = np.stack([y, x, z], 1)[ok]
    if len(points) == 0:  # a tiny lung: fall back to the middle of each lung
        points = np.array([[anat.lung_cy, anat.lung_cx(s), 0.5 * (anat.z_base + anat.z_apex)]
                           for s in _SIDES[side]])
    return points[np.arange(n) % len(points)]


def paint_irregular_blob(canvas: Canvas, centre, semi_axes, seed: int, value: float, *,
                         where: np.ndarray, alpha: float = 1.0, record: str | None = None,
                         roughness: float = 0.35) -> None:
    """An ellipsoid whose edge is made irregular by a smooth random field."""
    found = ellipsoid_box(canvas, centre, np.asarray(semi_axes) * 1.3)
    if found is None:
        return
    slices, coords = found
    field = lattice_field(seed, 12.0, *(canvas.axes[a][slices[a]] for a in range(3)))
    inside = ellipsoid_radius2(coords, centre, semi_axes) + roughness * field < 1.0
    inside &= where[slices]
    target = canvas.hu[slices]
    target[inside] = target[inside] * np.float32(1 - alpha) + np.float32(alpha * value)
    if record is not None:
        canvas.mask(record)[slices] |= inside


def draw_emphysema(rng, anat: Anatomy) -> Params:
    count = int(rng.integers(18, 31))
    centres = sample_lung_points(rng, anat, count, 4.0, u_range=(0.5, 0.95))
    return {"centres": centres, "radii": rng.uniform(6, 16, count),
            "shift_hu": rng.uniform(-60, -40), "details": {}}


def paint_emphysema(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    parenchyma = canvas.masks["parenchyma"]
    # Darker upper lungs, fading in over the middle third so that no edge shows.
    height = (canvas.z - anat.z_base) / (anat.z_apex - anat.z_base)
    shift = np.float32(p["shift_hu"]) * np.clip((height - 0.35) / 0.25, 0.0, 1.0)
    darker = np.broadcast_to(shift, parenchyma.shape)[parenchyma]
    canvas.hu[parenchyma] = np.maximum(canvas.hu[parenchyma] + darker, -1000.0)
    for centre, radius in zip(p["centres"], p["radii"]):
        paint_ellipsoid(canvas, centre, (radius,) * 3, -990.0, where=parenchyma)


def draw_atelectasis(rng, anat: Anatomy) -> Params:
    side = _choose_side(rng, 0.4, 0.3)
    return {"side": side, "z_mm": anat.z_base + rng.uniform(30, 55),
            "thickness_mm": rng.uniform(12, 18), "slope": rng.uniform(-0.3, 0.3),
            "hu": rng.uniform(-15, 15),
            "details": {"side": side, "lobe": _LOWER_LOBES[side]}}


def paint_atelectasis(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    band_z = p["z_mm"] + p["slope"] * (canvas.y - anat.lung_cy)
    band = (np.abs(canvas.z - band_z) < 0.5 * p["thickness_mm"]) & (
        canvas.y > anat.lung_cy - 0.1 * anat.lung_by)
    region = canvas.masks["parenchyma"] & band & _side_mask(canvas, anat, p["side"])
    canvas.hu[region] = p["hu"]


def draw_lung_nodule(rng, anat: Anatomy) -> Params:
    count = 1 + int(rng.random() < 0.4) + int(rng.random() < 0.15)
    radii = rng.uniform(8, 15, count)
    centres = np.array([sample_lung_points(rng, anat, 1, r + 2.0)[0] for r in radii])
    largest = int(np.argmax(radii))
    return {"centres": centres, "radii": radii, "hu": rng.uniform(25, 45),
            "details": {"size_mm": int(round(2 * radii[largest])), "count": count,
                        "lobe": lobe_of(anat, centres[largest])}}


def paint_lung_nodule(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    for centre, radius in zip(p["centres"], p["radii"]):
        paint_ellipsoid(canvas, centre, (radius,) * 3, p["hu"], where=canvas.masks["lungs"])


def draw_lung_opacity(rng, anat: Anatomy) -> Params:
    count = 1 + int(rng.random() < 0.35)
    centres = sample_lung_points(rng, anat, count, 10.0)
    patches = [(c, np.array([rng.uniform(25, 42), rng.uniform(25, 42), rng.uniform(30, 55)]),
                int(rng.integers(2 ** 31))) for c in centres]
    return {"patches": patches, "hu": rng.uniform(-520, -450),
            "details": {"lobe": lobe_of(anat, centres[0])}}


def paint_lung_opacity(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    for centre, semi, seed in p["patches"]:
        paint_irregular_blob(canvas, centre, semi, seed, p["hu"], alpha=0.9,
                              where=canvas.masks["parenchyma"])


def draw_fibrotic_sequela(rng, anat: Anatomy) -> Params:
    count = int(rng.integers(6, 11))
    starts = sample_lung_points(rng, anat, count, 6.0, u_range=(0.35, 0.95))
    streaks = []
    for start in starts:
        direction = unit_vector(rng.normal(size=3) * [1.0, 1.0, 0.6])
        end = start + rng.uniform(40, 80) * direction
        streaks.append((np.array([start, end]), rng.uniform(2.5, 3.5)))
    return {"streaks": streaks, "hu": rng.uniform(-80, -20),
            "details": {"lobe": lobe_of(anat, starts[0])}}


def paint_fibrotic_sequela(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    for points, radius in p["streaks"]:
        paint_polyline(canvas, points, radius, p["hu"], where=canvas.masks["parenchyma"])


def draw_pleural_effusion(rng, anat: Anatomy) -> Params:
    side = _choose_side(rng, 0.35, 0.25)
    thickness = rng.uniform(22, 40)
    return {"side": side, "thickness_mm": thickness, "height_mm": rng.uniform(90, 150),
            "hu": rng.uniform(5, 18), "details": {"side": side, "size_mm": int(round(thickness))}}


def paint_pleural_effusion(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    """Fluid fills the most dependent (posterior) part of the pleural space: a lung voxel
    is fluid when the lung ends less than the local fluid depth behind it."""
    rise = np.clip(1.0 - (canvas.z - anat.z_base) / p["height_mm"], 0.0, 1.0)
    depth = np.float32(p["thickness_mm"]) * rise ** 0.6
    dependent = ~lung_shape(anat, canvas.y + depth, canvas.x, canvas.z)
    region = (canvas.masks["lungs"] & dependent & _side_mask(canvas, anat, p["side"])
              & ~canvas.masks["heart"] & ~protected_mask(canvas))
    canvas.hu[region] = p["hu"]


def draw_mosaic_attenuation(rng, anat: Anatomy) -> Params:
    return {"cell_mm": rng.uniform(18, 24), "amplitude_hu": rng.uniform(90, 120),
            "seed": int(rng.integers(2 ** 31)), "details": {}}


def paint_mosaic_attenuation(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    # The sign of a smooth random field: irregular lobule-sized patches with sharp borders.
    cells = lattice_field(p["seed"], p["cell_mm"], *canvas.axes)
    parenchyma = canvas.masks["parenchyma"]
    offset = np.where(cells > 0, np.float32(p["amplitude_hu"]), np.float32(-p["amplitude_hu"]))
    canvas.hu[parenchyma] = np.maximum(canvas.hu[parenchyma] + offset[parenchyma], -1000.0)


def draw_peribronchial_thickening(rng, anat: Anatomy) -> Params:
    return {"wall_mm": rng.uniform(4.5, 6.0), "details": {}}


def modify_peribronchial_thickening(anat: Anatomy, p: Params) -> Anatomy:
    bronchi = [dataclasses.replace(b, wall_mm=p["wall_mm"]) for b in anat.bronchi]
    return dataclasses.replace(anat, bronchi=bronchi)


_LOBE_HEIGHTS = {"lower": (0.12, 0.4), "middle": (0.25, 0.45), "upper": (0.6, 0.85)}


def draw_consolidation(rng, anat: Anatomy) -> Params:
    side = "right" if rng.random() < 0.55 else "left"
    lobe = ("lower", "middle", "upper")[int(np.searchsorted([0.6, 0.8], rng.random()))]
    centre = sample_lung_points(rng, anat, 1, 15.0, side=side, u_range=_LOBE_HEIGHTS[lobe],
                                anterior=lobe == "middle")[0]
    semi = np.array([rng.uniform(30, 45), rng.uniform(30, 45), rng.uniform(35, 55)])
    bronchograms = []
    for _ in range(3):
        start = centre + rng.normal(0, 0.3, 3) * semi
        direction = unit_vector(rng.normal(size=3))
        half = 0.6 * float(semi.mean()) * direction
        bronchograms.append((np.array([start - half, start + half]), rng.uniform(2.0, 3.0)))
    return {"centre": centre, "semi": semi, "seed": int(rng.integers(2 ** 31)),
            "hu": rng.uniform(20, 40), "bronchograms": bronchograms,
            "details": {"side": side, "lobe": lobe_of(anat, centre)}}


def paint_consolidation(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    paint_irregular_blob(canvas, p["centre"], p["semi"], p["seed"], p["hu"],
                          where=canvas.masks["parenchyma"], record="consolidation")
    for points, radius in p["bronchograms"]:
        paint_polyline(canvas, points, radius, -920.0, where=canvas.masks["consolidation"])


def draw_bronchiectasis(rng, anat: Anatomy) -> Params:
    side = _choose_side(rng, 0.3, 0.3)
    tubes = []
    for s in _SIDES[side]:
        start = anat.hila[0 if s < 0 else 1] + [20.0, s * 14.0, -45.0]
        for _ in range(int(rng.integers(3, 6))):
            direction = unit_vector([rng.uniform(0.1, 0.6), s * rng.uniform(0.2, 0.7), -1.0]
                              + rng.normal(0, 0.15, 3))
            end = start + rng.uniform(50, 85) * direction
            lumen = rng.uniform(5.5, 8.0)
            tubes.append((np.array([start, end]), np.array([lumen, 0.8 * lumen]),
                          rng.uniform(2.5, 3.5)))
    return {"tubes": tubes, "details": {"side": side, "lobe": _LOWER_LOBES[side]}}


def paint_bronchiectasis(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    lungs = canvas.masks["lungs"] & ~canvas.masks["heart"]
    for points, lumen, wall in p["tubes"]:
        paint_polyline(canvas, points, lumen + wall, 40.0, where=lungs)
    for points, lumen, _ in p["tubes"]:
        paint_polyline(canvas, points, lumen, -1000.0, where=lungs)


def draw_septal_thickening(rng, anat: Anatomy) -> Params:
    return {"depth_mm": rng.uniform(12, 18), "cell_mm": rng.uniform(12, 16),
            "width_mm": rng.uniform(2.2, 3.0), "hu": rng.uniform(-200, -100),
            "seeds": (int(rng.integers(2 ** 31)), int(rng.integers(2 ** 31))), "details": {}}


def paint_septal_thickening(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    """A polygonal net of thin septal lines within `depth_mm` of the lung surface."""
    d = np.float32(p["depth_mm"])
    y, x, z = canvas.y, canvas.x, canvas.z
    deep = (lung_shape(anat, y + d, x, z) & lung_shape(anat, y - d, x, z)
            & lung_shape(anat, y, x + d, z) & lung_shape(anat, y, x - d, z))
    periphery = canvas.masks["parenchyma"] & ~deep
    warp_y = 8.0 * lattice_field(p["seeds"][0], 24.0, *canvas.axes)
    warp_x = 8.0 * lattice_field(p["seeds"][1], 24.0, *canvas.axes)
    cell, width = np.float32(p["cell_mm"]), np.float32(p["width_mm"])
    lines = (((y + warp_y) % cell) < width) | (((x + warp_x) % cell) < width)
    canvas.hu[periphery & lines] = p["hu"]
