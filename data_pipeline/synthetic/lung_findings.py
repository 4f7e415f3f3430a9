"""Findings of the lungs, airways and pleura (11 of the 18 labels).

Each finding has `draw_*(rng, anatomy) -> params` and either `paint_*(canvas, anatomy,
params)` or `modify_*(anatomy, params) -> anatomy`; see `abnormalities` for the registry.
Lung findings are painted only on lung parenchyma (the "parenchyma" mask: lung-shaped
voxels that are not heart, vessel or bronchial wall) or, where they replace whole lung
(effusion, bronchiectasis), on the lung shape.

Every `draw_*` takes the release's `conspicuity` (see `conspicuity`): 1.0 draws the
realistic parameters; larger values make each finding bigger, more numerous, more
extensive and denser (or darker) without moving it out of its region.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_pipeline.synthetic.anatomy import Anatomy, lobe_of, lung_shape, protected_mask
from data_pipeline.synthetic.conspicuity import (
    REALISTIC, exaggerated, extra, grow, more, toward)
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


def draw_emphysema(rng, anat: Anatomy, conspicuity: float = REALISTIC) -> Params:
    c = conspicuity
    count = int(rng.integers(more(18, c), more(31, c)))
    centres = sample_lung_points(rng, anat, count, 4.0, u_range=(0.5, 0.95))
    # Conspicuous: nearly air-dark lungs whose darkening starts lower down, bigger
    # bullae and hyperinflation (flattened diaphragm domes).  Lung is already close to
    # air, so the flattening, which turns liver and spleen under the domes into lung,
    # is what the coarse grid shows best.
    return {"centres": centres, "radii": rng.uniform(6, 16, count) * grow(c, 0.5),
            "shift_hu": rng.uniform(-60, -40) * grow(c, 0.8),
            "fade_from": toward(0.35, 0.0, c), "dome_scale": toward(1.0, 0.35, c),
            "details": {}}


def modify_emphysema(anat: Anatomy, p: Params) -> Anatomy:
    """Hyperinflation: both diaphragm domes flattened by `dome_scale` (1 = unchanged)."""
    if p["dome_scale"] == 1.0:
        return anat
    return dataclasses.replace(anat, dome_right=anat.dome_right * p["dome_scale"],
                               dome_left=anat.dome_left * p["dome_scale"])


def paint_emphysema(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    parenchyma = canvas.masks["parenchyma"]
    # Darker upper lungs, fading in over the middle third so that no edge shows.
    height = (canvas.z - anat.z_base) / (anat.z_apex - anat.z_base)
    shift = np.float32(p["shift_hu"]) * np.clip((height - p["fade_from"]) / 0.25, 0.0, 1.0)
    darker = np.broadcast_to(shift, parenchyma.shape)[parenchyma]
    canvas.hu[parenchyma] = np.maximum(canvas.hu[parenchyma] + darker, -1000.0)
    for centre, radius in zip(p["centres"], p["radii"]):
        paint_ellipsoid(canvas, centre, (radius,) * 3, -990.0, where=parenchyma)


def draw_atelectasis(rng, anat: Anatomy, conspicuity: float = REALISTIC) -> Params:
    c = conspicuity
    side = _choose_side(rng, toward(0.4, 0.05, c), toward(0.3, 0.05, c))
    # Conspicuous: a thicker plate (several demo slices) reaching further forward, more
    # often in both lungs.  (Moving it up and forward, away from effusions, made it
    # harder for the demo model to learn.)
    return {"side": side, "z_mm": anat.z_base + rng.uniform(30, 55),
            "thickness_mm": rng.uniform(12, 18) * grow(c, 1.2), "slope": rng.uniform(-0.3, 0.3),
            "hu": rng.uniform(-15, 15), "front": toward(0.1, 1.0, c),
            "details": {"side": side, "lobe": _LOWER_LOBES[side]}}


def paint_atelectasis(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    band_z = p["z_mm"] + p["slope"] * (canvas.y - anat.lung_cy)
    band = (np.abs(canvas.z - band_z) < 0.5 * p["thickness_mm"]) & (
        canvas.y > anat.lung_cy - p["front"] * anat.lung_by)
    region = canvas.masks["parenchyma"] & band & _side_mask(canvas, anat, p["side"])
    canvas.hu[region] = p["hu"]


def draw_lung_nodule(rng, anat: Anatomy, conspicuity: float = REALISTIC) -> Params:
    c = conspicuity
    # Conspicuous: a few dozen larger nodules scattered through both lungs, so that
    # most lung patches of the coarse grid hold the edge of one.
    count = 1 + int(rng.random() < 0.4) + int(rng.random() < 0.15) + extra(16.0, c)
    radii = rng.uniform(8, 15, count) * grow(c, 0.3)
    centres = np.array([sample_lung_points(rng, anat, 1, r + 2.0)[0] for r in radii])
    largest = int(np.argmax(radii))
    return {"centres": centres, "radii": radii, "hu": toward(rng.uniform(25, 45), 800.0, c),
            "details": {"size_mm": int(round(2 * radii[largest])), "count": count,
                        "lobe": lobe_of(anat, centres[largest])}}


def paint_lung_nodule(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    for centre, radius in zip(p["centres"], p["radii"]):
        paint_ellipsoid(canvas, centre, (radius,) * 3, p["hu"], where=canvas.masks["lungs"])


def draw_lung_opacity(rng, anat: Anatomy, conspicuity: float = REALISTIC) -> Params:
    count = 1 + int(rng.random() < 0.35) + extra(6.0, conspicuity)
    centres = sample_lung_points(rng, anat, count, 10.0)
    # Conspicuous: many denser patches, drawn towards the posterior upper lungs (where
    # aspiration goes in a supine patient) for a consistent place on the coarse grid.
    # Their size stays: the demo model sees a patch's edges, not its uniform interior.
    centres = _pulled_to(_posterior_upper(anat, centres), centres,
                         toward(0.0, 0.8, conspicuity))
    size = grow(conspicuity, 0.25)
    patches = [(c, np.array([rng.uniform(25, 42), rng.uniform(25, 42), rng.uniform(30, 55)])
                * size, int(rng.integers(2 ** 31))) for c in centres]
    return {"patches": patches, "hu": toward(rng.uniform(-520, -450), -50.0, conspicuity),
            "details": {"lobe": lobe_of(anat, centres[0])}}


def _hila_of(anat: Anatomy, points: np.ndarray) -> np.ndarray:
    """(N, 3): the hilum on the side of each point."""
    return np.where((points[:, 1] < anat.x0)[:, None], anat.hila[0], anat.hila[1])


def _posterior_upper(anat: Anatomy, points: np.ndarray) -> np.ndarray:
    """(N, 3): a point in the posterior part of the lung on the side of each point,
    3 cm above its hilum (posterior upper lobe / superior lower-lobe segment)."""
    hila = _hila_of(anat, points)
    x = np.where(points[:, 1] < anat.x0, anat.lung_cx(-1), anat.lung_cx(1))
    y = np.full(len(points), anat.lung_cy + 0.5 * anat.lung_by)
    return np.stack([y, x, hila[:, 2] + 30.0], 1)


def _pulled_to(targets: np.ndarray, points: np.ndarray, fraction: float) -> np.ndarray:
    """`points` moved `fraction` of the way towards `targets`."""
    if fraction == 0.0:
        return points
    return points + fraction * (targets - points)


def paint_lung_opacity(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    for centre, semi, seed in p["patches"]:
        paint_irregular_blob(canvas, centre, semi, seed, p["hu"], alpha=0.9,
                              where=canvas.masks["parenchyma"])


def draw_fibrotic_sequela(rng, anat: Anatomy, conspicuity: float = REALISTIC) -> Params:
    c = conspicuity
    # Conspicuous: many more, thicker and denser bands, crowded into the upper lungs.
    count = int(rng.integers(more(6, c, 1.5), more(11, c, 1.5)))
    starts = sample_lung_points(rng, anat, count, 6.0, u_range=(toward(0.35, 0.6, c), 0.95))
    streaks = []
    # Conspicuous bands also turn towards the hilum (retraction), which keeps them in
    # the lung instead of running out of the narrow apex.
    hila = _hila_of(anat, starts)
    for start, hilum in zip(starts, hila):
        direction = unit_vector(rng.normal(size=3) * [1.0, 1.0, 0.6])
        if exaggerated(c):
            direction = unit_vector(direction + toward(0.0, 1.5, c) * unit_vector(hilum - start))
        end = start + rng.uniform(40, 80) * grow(c, 0.4) * direction
        streaks.append((np.array([start, end]), rng.uniform(2.5, 3.5) * grow(c, 0.8)))
    # ... and an apical cap of scar tissue, a fixed place the coarse grid always shows.
    return {"streaks": streaks, "hu": toward(rng.uniform(-80, -20), 30.0, c),
            "cap_mm": toward(0.0, 60.0, c),
            "cap_seed": int(rng.integers(2 ** 31)) if exaggerated(c) else 0,
            "details": {"lobe": lobe_of(anat, starts[0])}}


def paint_fibrotic_sequela(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    for points, radius in p["streaks"]:
        paint_polyline(canvas, points, radius, p["hu"], where=canvas.masks["parenchyma"])
    if p["cap_mm"] > 0:
        _paint_apical_cap(canvas, anat, p["cap_mm"], p["cap_seed"], p["hu"])


def _paint_apical_cap(canvas: Canvas, anat: Anatomy, depth_mm: float, seed: int,
                      hu: float) -> None:
    """Scar tissue filling the top `depth_mm` (+-35 %, irregular border) of both lungs."""
    found = canvas.box((-1e4, -1e4, anat.z_apex - 1.5 * depth_mm), (1e4, 1e4, anat.z_apex + 1.0))
    if found is None:
        return
    slices, (_, _, z) = found
    border = depth_mm * (1.0 + 0.35 * lattice_field(
        seed, 15.0, *(canvas.axes[a][slices[a]] for a in range(3))))
    cap = (z > anat.z_apex - border) & canvas.masks["parenchyma"][slices]
    canvas.hu[slices][cap] = hu


def draw_pleural_effusion(rng, anat: Anatomy, conspicuity: float = REALISTIC) -> Params:
    side = _choose_side(rng, 0.35, 0.25)
    thickness = rng.uniform(22, 40) * grow(conspicuity, 0.4)
    return {"side": side, "thickness_mm": thickness,
            "height_mm": rng.uniform(90, 150) * grow(conspicuity, 0.2),
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


def draw_mosaic_attenuation(rng, anat: Anatomy, conspicuity: float = REALISTIC) -> Params:
    # Conspicuous: ground-glass-dense patches next to air-dark ones (the dark half is
    # cut off at air), bright ones prevailing in the upper lobes and air trapping in
    # the lower lobes.  The demo model barely sees uniform changes of lung density,
    # only contrasts inside its 45 mm patches; the lobar split puts one such contrast
    # at the same place in every patient.
    return {"cell_mm": rng.uniform(18, 24),
            "amplitude_hu": rng.uniform(90, 120) * grow(conspicuity, 1.9),
            "threshold": toward(0.0, -0.3, conspicuity),
            "lobar_bias": toward(0.0, 3.0, conspicuity),
            "seed": int(rng.integers(2 ** 31)), "details": {}}


def paint_mosaic_attenuation(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    # The sign of a smooth random field: irregular lobule-sized patches with sharp borders.
    cells = lattice_field(p["seed"], p["cell_mm"], *canvas.axes)
    if p["lobar_bias"] > 0:
        cells += np.where(_behind_oblique_fissure(anat, canvas.y, canvas.z),
                          np.float32(-p["lobar_bias"]), np.float32(p["lobar_bias"]))
    parenchyma = canvas.masks["parenchyma"]
    offset = np.where(cells > p["threshold"], np.float32(p["amplitude_hu"]),
                      np.float32(-p["amplitude_hu"]))
    canvas.hu[parenchyma] = np.maximum(canvas.hu[parenchyma] + offset[parenchyma], -1000.0)


def _behind_oblique_fissure(anat: Anatomy, y, z):
    """True in the lower lobes: behind a plane through the hila that slopes from
    posterior-superior to anterior-inferior, like the oblique fissures."""
    hilum_z = float(np.mean(anat.hila[:, 2]))
    return y > anat.lung_cy + anat.lung_by * (z - hilum_z) / 100.0


def draw_peribronchial_thickening(rng, anat: Anatomy,
                                  conspicuity: float = REALISTIC) -> Params:
    # Conspicuous: thicker cuffs that also follow the bronchi further into the lung.
    return {"wall_mm": rng.uniform(4.5, 6.0) * grow(conspicuity, 1.0),
            "reach": toward(1.0, 1.5, conspicuity), "details": {}}


def modify_peribronchial_thickening(anat: Anatomy, p: Params) -> Anatomy:
    carina = anat.trachea.points[-1]
    bronchi = []
    for bronchus in anat.bronchi:
        points = bronchus.points
        if p["reach"] != 1.0 and not np.array_equal(points[0], carina):  # not a main bronchus
            points = np.array([points[0], points[0] + p["reach"] * (points[1] - points[0])])
        bronchi.append(dataclasses.replace(bronchus, points=points, wall_mm=p["wall_mm"]))
    return dataclasses.replace(anat, bronchi=bronchi)


_LOBE_HEIGHTS = {"lower": (0.12, 0.4), "middle": (0.25, 0.45), "upper": (0.6, 0.85)}


def draw_consolidation(rng, anat: Anatomy, conspicuity: float = REALISTIC) -> Params:
    side = "right" if rng.random() < 0.55 else "left"
    # Conspicuous: mostly in the middle lobe / lingula and the anterior upper lobes,
    # away from the posterior lung bases that effusion and atelectasis fill.
    lobe_odds = [toward(0.6, 0.0, conspicuity), toward(0.8, 0.5, conspicuity)]
    lobe = ("lower", "middle", "upper")[int(np.searchsorted(lobe_odds, rng.random()))]
    anterior = lobe == "middle" or (lobe == "upper" and exaggerated(conspicuity))
    centre = sample_lung_points(rng, anat, 1, 15.0, side=side, u_range=_LOBE_HEIGHTS[lobe],
                                anterior=anterior)[0]
    semi = (np.array([rng.uniform(30, 45), rng.uniform(30, 45), rng.uniform(35, 55)])
            * grow(conspicuity, 0.6))
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


def draw_bronchiectasis(rng, anat: Anatomy, conspicuity: float = REALISTIC) -> Params:
    c = conspicuity
    side = _choose_side(rng, toward(0.3, 0.15, c), toward(0.3, 0.15, c))
    tubes = []
    # Conspicuous: more often both lungs, many more and thicker-walled tubes crowding
    # the lower lobe.
    for s in _SIDES[side]:
        start = anat.hila[0 if s < 0 else 1] + [20.0, s * 14.0, -45.0]
        for _ in range(int(rng.integers(more(3, c, 1.6), more(6, c, 1.6)))):
            direction = unit_vector([rng.uniform(0.1, 0.6), s * rng.uniform(0.2, 0.7), -1.0]
                              + rng.normal(0, 0.15, 3))
            end = start + rng.uniform(50, 85) * grow(c, 0.5) * direction
            lumen = rng.uniform(5.5, 8.0) * grow(c, 0.4)
            wall = rng.uniform(2.5, 3.5) * grow(c, 2.0)
            tubes.append((np.array([start, end]), np.array([lumen, 0.8 * lumen]), wall))
    return {"tubes": tubes, "details": {"side": side, "lobe": _LOWER_LOBES[side]}}


def paint_bronchiectasis(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    lungs = canvas.masks["lungs"] & ~canvas.masks["heart"]
    for points, lumen, wall in p["tubes"]:
        paint_polyline(canvas, points, lumen + wall, 40.0, where=lungs)
    for points, lumen, _ in p["tubes"]:
        paint_polyline(canvas, points, lumen, -1000.0, where=lungs)


def draw_septal_thickening(rng, anat: Anatomy, conspicuity: float = REALISTIC) -> Params:
    c = conspicuity
    # Conspicuous: a deeper rim of thicker, denser lines that brightens the lung
    # periphery as a whole on the coarse grid.
    return {"depth_mm": rng.uniform(12, 18) * grow(c, 0.5), "cell_mm": rng.uniform(12, 16),
            "width_mm": rng.uniform(2.2, 3.0) * grow(c, 0.5),
            "hu": toward(rng.uniform(-200, -100), 0.0, c),
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
