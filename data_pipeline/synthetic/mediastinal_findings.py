"""Findings of the heart, vessels and mediastinum: medical material, arterial wall and
coronary calcification, cardiomegaly, pericardial effusion, hiatal hernia and
lymphadenopathy.

Each finding has `draw_*(rng, anatomy) -> params` and either `paint_*(canvas, anatomy,
params)` or `modify_*(anatomy, params) -> anatomy`; see `abnormalities` for the registry.
Points are (y, x, z) mm: anterior->posterior, right->left, inferior->superior.

Every `draw_*` takes the release's `conspicuity` (see `conspicuity`): 1.0 draws the
realistic parameters; larger values make each finding bigger, more numerous and more
contrasty.  Calcium and metal are clipped to +1000 HU by the demo like bone, so their
conspicuous versions differ from bone by extent and location, not brightness.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_pipeline.synthetic.anatomy import Anatomy, protected_mask
from data_pipeline.synthetic.conspicuity import (
    REALISTIC, exaggerated, grow, more, toward)
from data_pipeline.synthetic.canvas import (
    Canvas, ellipsoid_box, ellipsoid_radius2, lattice_field, paint_ellipsoid, paint_polyline,
    unit_vector)

Params = dict[str, Any]


def draw_medical_material(rng, anat: Anatomy, conspicuity: float = REALISTIC) -> Params:
    kind = ("cardiac pacemaker", "port catheter", "sternotomy wires")[rng.integers(3)]
    side = (1 if rng.random() < 0.8 else -1) * (1 if kind == "cardiac pacemaker" else -1)
    x = anat.x0 + side * rng.uniform(55, 80)
    front = anat.y0 - anat.body_b * np.sqrt(max(1 - ((x - anat.x0) / anat.body_a) ** 2, 0.0))
    device = np.array([front + anat.skin_mm + 6.0, x, anat.z_apex - rng.uniform(20, 40)])
    svc_y, svc_x = anat.svc[0, 0], anat.svc[0, 1]
    heart = anat.heart
    lead = np.array([device, [front + 25.0, 0.5 * (x + anat.x0), anat.z_apex + 5.0],
                     [svc_y, svc_x, anat.z_carina + 20.0],
                     [svc_y, svc_x, heart.centre[2] + 0.5 * heart.semi_axes[2]],
                     heart.centre + [-10.0, 15.0, -0.3 * heart.semi_axes[2]]])
    wires = []
    if kind == "sternotomy wires":
        angles = np.linspace(0, 2 * np.pi, 13)
        start, gap = anat.z_carina + 30.0, rng.uniform(22, 28)
        for i in range(int(rng.integers(5, 8))):
            loop = np.stack([anat.cav_front - 6.0 + 9.0 * np.sin(angles),
                             anat.x0 + 18.0 * np.cos(angles),
                             np.full_like(angles, start - i * gap)], 1)
            wires.append(loop)
    semi = (5.0, 22.0, 18.0) if kind == "cardiac pacemaker" else (7.0, 14.0, 14.0)
    if exaggerated(conspicuity):  # a bigger device, thicker lead and wires
        semi = tuple(float(v) * grow(conspicuity, 0.6) for v in semi)
    wire_mm = 2.0 * grow(conspicuity, 0.8)
    return {"kind": kind, "device": device, "semi": semi, "lead": lead, "wires": wires,
            "lead_mm": wire_mm, "wire_mm": wire_mm, "details": {"device": kind}}


def paint_medical_material(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    if p["kind"] == "sternotomy wires":
        for loop in p["wires"]:
            paint_polyline(canvas, loop, p["wire_mm"], 3000.0)
        return
    paint_ellipsoid(canvas, p["device"], p["semi"], 3000.0)
    paint_polyline(canvas, p["lead"], p["lead_mm"], 2600.0)


def _aorta_positions(anat: Anatomy, count: int = 60) -> tuple[np.ndarray, ...]:
    """Evenly spaced centre-line points, unit directions and radii of the thoracic aorta."""
    points, radii = anat.aorta, anat.aorta_radii
    lengths = np.linalg.norm(np.diff(points, axis=0), axis=1)
    where = np.linspace(0, lengths.sum(), count)
    segment = np.clip(np.searchsorted(np.cumsum(lengths), where), 0, len(lengths) - 1)
    t = (where - (np.cumsum(lengths) - lengths)[segment]) / lengths[segment]
    centre = points[segment] + t[:, None] * (points[segment + 1] - points[segment])
    direction = (points[segment + 1] - points[segment]) / lengths[segment][:, None]
    radius = radii[segment] + t * (radii[segment + 1] - radii[segment])
    keep = centre[:, 2] > anat.z_base + 10.0
    return centre[keep], direction[keep], radius[keep]


def draw_arterial_wall_calcification(rng, anat: Anatomy,
                                     conspicuity: float = REALISTIC) -> Params:
    c = conspicuity
    centre, direction, radius = _aorta_positions(anat)
    # Conspicuous: many more, longer and thicker plaques (a largely calcified aorta),
    # set deeper into the wall so that they stay on the aorta.
    inset = 1.0 * grow(c, 1.2)
    plaques = []
    for i in rng.integers(len(centre), size=int(rng.integers(more(6, c), more(13, c)))):
        normal = unit_vector(np.cross(direction[i], rng.normal(size=3)))
        middle = centre[i] + (radius[i] - inset) * normal
        half = 0.5 * rng.uniform(12, 25) * grow(c, 0.5) * direction[i]
        plaques.append((np.array([middle - half, middle + half]),
                        rng.uniform(3.0, 4.0) * grow(c, 0.5),
                        toward(rng.uniform(700, 900), 1000.0, c)))
    return {"plaques": plaques, "details": {}}


def paint_arterial_wall_calcification(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    for points, radius, value in p["plaques"]:
        paint_polyline(canvas, points, radius, value)


def draw_cardiomegaly(rng, anat: Anatomy, conspicuity: float = REALISTIC) -> Params:
    return {"scale": toward(rng.uniform(1.35, 1.45), 1.65, conspicuity),
            "scale_z": toward(rng.uniform(1.1, 1.2), 1.3, conspicuity), "details": {}}


def modify_cardiomegaly(anat: Anatomy, p: Params) -> Anatomy:
    heart = anat.heart
    scale = np.array([1.0 + 0.6 * (p["scale"] - 1.0), p["scale"], p["scale_z"]])
    grow = heart.semi_axes * (scale - 1.0)
    # The enlarged heart keeps resting on the diaphragm, the chest wall and the spine,
    # so it grows along its long axis to the left-anterior, and upwards.
    long_axis = np.array([np.sin(heart.angle_xy), np.cos(heart.angle_xy), 0.0])
    shift = 0.7 * grow[1] * long_axis + [0.0, 0.0, 0.6 * grow[2]]
    enlarged = dataclasses.replace(heart, centre=heart.centre + shift,
                                   semi_axes=heart.semi_axes * scale)
    return dataclasses.replace(anat, heart=enlarged)


def draw_pericardial_effusion(rng, anat: Anatomy, conspicuity: float = REALISTIC) -> Params:
    thickness = rng.uniform(14, 22) * grow(conspicuity, 0.3)
    return {"thickness_mm": thickness, "hu": rng.uniform(0, 12),
            "details": {"size_mm": int(round(thickness))}}


def modify_pericardial_effusion(anat: Anatomy, p: Params) -> Anatomy:
    heart = dataclasses.replace(anat.heart, effusion_mm=p["thickness_mm"], effusion_hu=p["hu"])
    return dataclasses.replace(anat, heart=heart)


def draw_coronary_calcification(rng, anat: Anatomy, conspicuity: float = REALISTIC) -> Params:
    c = conspicuity
    segments = []
    # Conspicuous: many long, thick segments that also reach the lower heart.
    for _ in range(int(rng.integers(more(3, c, 1.3), more(6, c, 1.3)))):
        start, span = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 0.9) * grow(c, 0.5)
        height, drift = rng.uniform(toward(0.0, -0.5, c), 0.6), rng.uniform(-0.15, 0.15)
        segments.append((start, span, height, drift, rng.uniform(3.0, 3.8) * grow(c, 0.5),
                         toward(rng.uniform(800, 1000), 1000.0, c)))
    # Conspicuous segments are thicker than half the fat rim, so they run deeper in it
    # (touching the myocardium) to stay inside the pericardium.
    return {"segments": segments, "rim_fraction": toward(0.5, 0.25, c), "details": {}}


def paint_coronary_calcification(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    heart = anat.heart
    # Coronary arteries run in the epicardial fat, half way through the rim when realistic.
    scale = 1.0 + p["rim_fraction"] * heart.rim_mm / float(np.mean(heart.semi_axes[:2]))
    for start, span, height, drift, radius, value in p["segments"]:
        steps = np.linspace(0.0, 1.0, 5)
        points = [heart.surface_point(start + s * span, height + s * drift, scale) for s in steps]
        paint_polyline(canvas, np.array(points), radius, value)


def draw_hiatal_hernia(rng, anat: Anatomy, conspicuity: float = REALISTIC) -> Params:
    centre = np.array([anat.vb_y - anat.vb_r - rng.uniform(24, 32), anat.x0 + rng.uniform(-4, 12),
                       anat.z_base + 0.9 * anat.dome_left + rng.uniform(15, 30)])
    semi = (np.array([rng.uniform(22, 28), rng.uniform(24, 32), rng.uniform(24, 32)])
            * grow(conspicuity, 0.2))
    level = centre[0] - semi[0] * rng.uniform(0.05, 0.35)
    return {"centre": centre, "semi": semi, "air_level_y": level,
            "seed": int(rng.integers(2 ** 31)), "details": {}}


def paint_hiatal_hernia(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    where = canvas.masks["cavity"] & ~protected_mask(canvas)
    paint_ellipsoid(canvas, p["centre"], p["semi"], 40.0, where=where)  # stomach wall
    inner = p["semi"] - 3.0
    found = ellipsoid_box(canvas, p["centre"], inner)
    if found is None:
        return
    slices, (y, x, z) = found
    inside = (ellipsoid_radius2((y, x, z), p["centre"], inner) < 1.0) & where[slices]
    food = 25.0 + 50.0 * lattice_field(p["seed"], 8.0, *(canvas.axes[a][slices[a]]
                                                           for a in range(3)))
    # Supine patient: gas rises anteriorly above a fluid level.
    contents = np.where(y < p["air_level_y"], np.float32(-1000.0), food)
    canvas.hu[slices][inside] = np.broadcast_to(contents, inside.shape)[inside]


def draw_lymphadenopathy(rng, anat: Anatomy, conspicuity: float = REALISTIC) -> Params:
    c = conspicuity
    (y_tr, x_tr, z_car), hila = anat.trachea.points[1], anat.hila
    stations = np.array([[y_tr - 5, x_tr - 20, z_car + 30],  # right paratracheal
                         [y_tr - 8, x_tr + 22, z_car + 10],  # aortopulmonary window
                         [y_tr + 12, x_tr, z_car - 25],  # subcarinal
                         [anat.cav_front + 30, anat.x0 + 5, z_car + 20],  # prevascular
                         hila[0] + [-5, -10, -5], hila[1] + [-5, 10, -5]])  # hilar
    if exaggerated(c):
        chosen = _conspicuous_stations(stations, c)
    else:
        chosen = rng.choice(len(stations), size=int(rng.integers(3, 6)), replace=False)
        if not np.isin(chosen, [4, 5]).any():
            chosen[-1] = 4 + int(rng.integers(2))  # hilar nodes are the most conspicuous
    nodes = []
    for index in chosen:
        radius = rng.uniform(9, 14) * grow(c, 0.9)
        semi = radius * np.array([1.0, rng.uniform(0.9, 1.2), rng.uniform(1.0, 1.4)])
        nodes.append((stations[index] + rng.normal(0, 4, 3), semi))
    short_axis = max(2 * float(semi.min()) for _, semi in nodes)  # of the largest node
    return {"nodes": nodes, "details": {"size_mm": int(round(short_axis))}}


def _conspicuous_stations(stations: np.ndarray, conspicuity: float) -> np.ndarray:
    """Indices of the paratracheal, aortopulmonary and prevascular stations, the first
    two moved out so that their (bulky) nodes bulge into the upper lungs.

    The hilar and subcarinal stations are left out: thickened bronchial walls crowd
    them, while a node replacing mediastinal fat, or bulging into the upper lung
    beside the trachea, is a contrast nothing else makes there.
    """
    stations[:, 1] += toward(0.0, 30.0, conspicuity) * np.array([-1, 1, 0, 0, 0, 0])
    return np.array([0, 1, 3])


def paint_lymphadenopathy(canvas: Canvas, anat: Anatomy, p: Params) -> None:
    where = (canvas.masks["thorax"] & ~protected_mask(canvas) & ~canvas.masks["heart"])
    for centre, semi in p["nodes"]:
        paint_ellipsoid(canvas, centre, semi, 45.0, where=where)
