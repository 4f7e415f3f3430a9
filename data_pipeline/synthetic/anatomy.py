"""The normal chest of the phantom: random geometry (`draw_anatomy`) and its rasterisation
(`paint_anatomy`).

All geometry is in mm relative to the volume centre with points as (y, x, z):
y anterior -> posterior, x patient right -> left, z inferior -> superior (see
`canvas`).  Soft tissue ~40 HU, subcutaneous and mediastinal fat ~-100, lungs ~-850
with texture and a dependent gradient, bone 400-1000, airways and outside air -1000.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline.synthetic.canvas import (
    Canvas, lattice_field, paint_ellipsoid, paint_polyline)

FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
MUSCLE_HU = 50.0
LUNG_HU = -865.0
BONE_CORTEX_HU = 900.0
BONE_MARROW_HU = 420.0
RIB_HU = 650.0
NORMAL_AIRWAY_WALL_MM = 1.5
# Parenchyma = lung-shaped voxels still darker than this after the normal anatomy is
# painted (i.e. not heart, vessels or bronchial walls).
PARENCHYMA_MAX_HU = -600.0


@dataclasses.dataclass
class Heart:
    """Heart ellipsoid: semi-axes (short, long, craniocaudal) mm, turned by `angle_xy`
    so that the long axis points to the left-anterior."""

    centre: np.ndarray
    semi_axes: np.ndarray
    angle_xy: float
    fat_mm: float  # epicardial fat ring
    effusion_mm: float = 0.0  # pericardial fluid rim that replaces the fat ring
    effusion_hu: float = 15.0

    @property
    def rim_mm(self) -> float:
        return self.effusion_mm if self.effusion_mm > 0 else self.fat_mm

    @property
    def outer_scale(self) -> float:
        """Normalised radius of the outside of the fat/fluid rim."""
        return 1.0 + self.rim_mm / float(np.mean(self.semi_axes[:2]))

    def surface_point(self, angle: float, height: float, scale: float = 1.0) -> np.ndarray:
        """Point (y, x, z) on the ellipsoid scaled by `scale` at in-plane `angle` (radians,
        in the heart's own frame) and relative `height` in (-1, 1)."""
        ring = scale * np.sqrt(max(1.0 - height ** 2, 0.0))
        u = ring * self.semi_axes[0] * np.cos(angle)
        v = ring * self.semi_axes[1] * np.sin(angle)
        c, s = np.cos(self.angle_xy), np.sin(self.angle_xy)
        dy, dx = c * u + s * v, -s * u + c * v
        return self.centre + np.array([dy, dx, height * scale * self.semi_axes[2]])


@dataclasses.dataclass
class Airway:
    """A bronchus: centre line (N, 3) mm, lumen radius and wall thickness in mm."""

    points: np.ndarray
    lumen_mm: float
    wall_mm: float = NORMAL_AIRWAY_WALL_MM


@dataclasses.dataclass
class Anatomy:
    """Random but normal geometry of one patient's chest (mm, (y, x, z))."""

    x0: float
    y0: float
    body_a: float  # body semi-axes: lateral, anteroposterior
    body_b: float
    skin_mm: float
    fat_mm: float
    cav_a: float  # thoracic cavity ellipse (inside the chest wall)
    cav_b: float
    cav_yc: float
    med_hw: float  # half width of the mediastinal band between the lungs
    z_apex: float
    z_base: float  # lowest (posterior costophrenic) point of the lungs
    z_carina: float
    dome_right: float  # diaphragm dome heights above z_base
    dome_left: float
    vb_y: float  # vertebral body centre (y) and radius
    vb_r: float
    disc_period: float
    disc_phase: float
    rib_period: float
    rib_height: float
    rib_slope: float
    rib_phase: float
    heart: Heart
    aorta: np.ndarray
    aorta_radii: np.ndarray
    pulmonary_arteries: list[tuple[np.ndarray, float]]
    svc: np.ndarray
    esophagus: np.ndarray
    trachea: Airway
    bronchi: list[Airway]  # the central bronchi (main, lobar, segmental)
    vessels: list[tuple[np.ndarray, np.ndarray]]
    hila: np.ndarray  # (2, 3): right, left
    texture_seed: int

    # Derived lung geometry: one ellipse per side, clipped by the cavity and mediastinum.
    @property
    def lung_ax(self) -> float:
        return 0.625 * (self.cav_a - self.med_hw)

    @property
    def lung_by(self) -> float:
        return 1.2 * self.cav_b

    @property
    def lung_cy(self) -> float:
        return self.cav_yc + 0.05 * self.cav_b

    def lung_cx(self, side: int) -> float:
        """Lateral centre of the right (side -1) or left (+1) lung."""
        return self.x0 + side * 0.5 * (self.med_hw + self.cav_a)

    @property
    def cav_front(self) -> float:
        return self.cav_yc - self.cav_b


def _vector(rng, mean, sd=4.0) -> np.ndarray:
    return np.asarray(mean, np.float64) + rng.normal(0.0, sd, 3)


def _draw_heart(rng, cav_front: float, x0: float, z_base: float, dome_left: float) -> Heart:
    semi = np.array([rng.uniform(38, 45), rng.uniform(50, 60), rng.uniform(40, 48)])
    angle = -np.radians(rng.uniform(25, 40))
    half_y = np.hypot(np.cos(angle) * semi[0], np.sin(angle) * semi[1])
    centre = np.array([cav_front + half_y + 3.0, x0 + rng.uniform(12, 24),
                       z_base + 0.7 * dome_left + 0.75 * semi[2]])
    return Heart(centre, semi, float(angle), fat_mm=rng.uniform(6.0, 8.0))


def _draw_aorta(rng, heart: Heart, cav_front, x0, vb_y, vb_r, z_carina, z_base):
    r_asc, r_desc = rng.uniform(13, 16), rng.uniform(10, 12.5)
    z_arch = z_carina + rng.uniform(15, 25)
    root = np.array([heart.centre[0] - 5, x0 - 4, heart.centre[2] + 0.4 * heart.semi_axes[2]])
    top = np.array([cav_front + r_asc + 16, x0 - 8 + rng.uniform(-3, 3), z_arch])
    desc = np.array([vb_y - 0.9 * vb_r, x0 + vb_r + 0.5 * r_desc, z_arch])
    t = np.linspace(0.0, 1.0, 7)
    arch = top + t[:, None] * (desc - top)
    arch[:, 1] += 8.0 * np.sin(np.pi * t)
    arch[:, 2] += rng.uniform(8, 16) * np.sin(np.pi * t)
    bottom = desc + np.array([3.0, -6.0, z_base - 150.0 - z_arch])
    points = np.vstack([root, arch, bottom])
    radii = np.concatenate([[r_asc], r_asc + t * (r_desc - r_asc), [r_desc]])
    return points, radii


def _draw_bronchi(rng, carina, hila) -> list[Airway]:
    bronchi = []
    for side, hilum in zip((-1, 1), hila):
        bronchi.append(Airway(np.array([carina, hilum]), 6.5 if side < 0 else 6.0))
        ends = {}
        for lobe, offset, lumen in (("upper", (-6, 20, 28), 4.5), ("lower", (20, 14, -45), 4.5),
                                    ("middle", (-30, 18, -24), 3.8)):
            end = hilum + _vector(rng, (offset[0], side * offset[1], offset[2]))
            ends[lobe] = end
            bronchi.append(Airway(np.array([hilum, end]), lumen))
        for lobe, offsets in (("upper", ((-22, 16, 26), (14, 22, 22))),
                              ("lower", ((22, 12, -35), (-6, 24, -32), (26, -2, -28)))):
            for offset in offsets:
                end = ends[lobe] + _vector(rng, (offset[0], side * offset[1], offset[2]))
                bronchi.append(Airway(np.array([ends[lobe], end]), 3.2))
    return bronchi


def _draw_vessels(rng, hila) -> list[tuple[np.ndarray, np.ndarray]]:
    vessels = []
    for side, hilum in zip((-1, 1), hila):
        for _ in range(9):
            start = hilum + rng.normal(0.0, 5.0, 3)
            direction = np.array([rng.normal(0, 0.7), side * (0.9 + abs(rng.normal(0, 0.3))),
                                  rng.normal(0, 0.9)])
            direction /= np.linalg.norm(direction)
            length = rng.uniform(70, 120)
            steps = np.arange(4)[:, None] / 3.0
            points = start + steps * length * direction
            points[1:] += rng.normal(0.0, 6.0, (3, 3))
            vessels.append((points, np.array([4.0, 3.0, 2.2, 1.5])))
    return vessels


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draws one patient's normal chest geometry (sizes in mm, vary per patient)."""
    x0, y0 = rng.uniform(-6, 6), rng.uniform(-2, 10)
    body_a, body_b = rng.uniform(140, 162), rng.uniform(100, 118)
    skin, fat = 3.0, rng.uniform(8, 24)
    wall_front, wall_side, wall_back = rng.uniform(10, 15), rng.uniform(10, 15), rng.uniform(22, 30)
    cav_a = body_a - skin - fat - wall_side
    cav_front = y0 - body_b + skin + fat + wall_front
    cav_back = y0 + body_b - skin - fat - wall_back
    cav_yc, cav_b = 0.5 * (cav_front + cav_back), 0.5 * (cav_back - cav_front)
    med_hw = rng.uniform(20, 27)
    z_apex = rng.uniform(105, 128)
    z_base = z_apex - rng.uniform(215, 240)
    z_carina = z_apex - rng.uniform(85, 100)
    dome_left = rng.uniform(45, 62)
    dome_right = dome_left + rng.uniform(8, 18)
    vb_r = rng.uniform(16, 20)
    vb_y = cav_back - 1.3 * vb_r

    heart = _draw_heart(rng, cav_front, x0, z_base, dome_left)
    aorta, aorta_radii = _draw_aorta(rng, heart, cav_front, x0, vb_y, vb_r, z_carina, z_base)
    y_trachea = vb_y - vb_r - rng.uniform(20, 26)
    carina = np.array([y_trachea, x0 + rng.uniform(-3, 3), z_carina])
    hila = np.array([[y_trachea + 6, x0 - med_hw - 14, z_carina - 20],
                     [y_trachea + 8, x0 + med_hw + 14, z_carina - 12]])
    trachea = Airway(np.array([carina + [0, 0, 400.0], carina]), rng.uniform(8, 10.5), 2.0)
    bifurcation = np.array([y_trachea - 12, x0 + 8, z_carina - 22])
    trunk_start = np.array([heart.centre[0] - 30, x0 + 12,
                            heart.centre[2] + 0.7 * heart.semi_axes[2]])
    pulmonary_arteries = [(np.array([trunk_start, bifurcation]), 13.0),
                          (np.array([bifurcation, hila[0]]), 10.0),
                          (np.array([bifurcation, hila[1] + [0, 0, 8]]), 10.0)]
    svc = np.array([[aorta[1, 0] + 4, x0 - 30, heart.centre[2] + 0.6 * heart.semi_axes[2]],
                    [aorta[1, 0] + 4, x0 - 30, 400.0]])
    esophagus = np.array([[vb_y - vb_r - 7, x0 + 7, 400.0],
                          [vb_y - vb_r - 7, x0 + 7, z_base + 40],
                          [vb_y - vb_r - 15, x0 + 25, z_base - 10]])
    return Anatomy(
        x0=x0, y0=y0, body_a=body_a, body_b=body_b, skin_mm=skin, fat_mm=fat,
        cav_a=cav_a, cav_b=cav_b, cav_yc=cav_yc, med_hw=med_hw,
        z_apex=z_apex, z_base=z_base, z_carina=z_carina,
        dome_right=dome_right, dome_left=dome_left, vb_y=vb_y, vb_r=vb_r,
        disc_period=rng.uniform(26, 30), disc_phase=rng.uniform(0, 30),
        rib_period=rng.uniform(24, 28), rib_height=rng.uniform(9, 12),
        rib_slope=rng.uniform(35, 55), rib_phase=rng.uniform(0, 28),
        heart=heart, aorta=aorta, aorta_radii=aorta_radii,
        pulmonary_arteries=pulmonary_arteries, svc=svc, esophagus=esophagus,
        trachea=trachea, bronchi=_draw_bronchi(rng, carina, hila),
        vessels=_draw_vessels(rng, hila), hila=hila,
        texture_seed=int(rng.integers(2 ** 31)))


# ----------------------------------------------------------------------------------
# Analytic shapes (work on any broadcastable coordinate arrays, also single points)
# ----------------------------------------------------------------------------------


def lung_taper2(anat: Anatomy, z):
    """Squared scale (0..1) of the lung cross-section at height z: rounded towards the
    apex, slightly narrower at the base, 0 outside the lungs' z range."""
    u = (z - anat.z_base) / (anat.z_apex - anat.z_base)
    upper = np.clip(1.0 - ((u - 0.45) / 0.55) ** 2, 0.0, 1.0)
    lower = (1.0 - 0.08 * ((0.45 - u) / 0.45) ** 2) ** 2
    return np.where((u < 0) | (u > 1), 0.0, np.where(u > 0.45, upper, lower)).astype(np.float32)


def diaphragm_z(anat: Anatomy, y, x):
    """Height (mm) of the diaphragm surface: a dome per side (the right one higher),
    lowest in the posterior and lateral costophrenic recesses."""
    right = x < anat.x0
    centre_x = np.where(right, anat.lung_cx(-1), anat.lung_cx(1))
    dome = np.where(right, anat.dome_right, anat.dome_left)
    q = (((x - centre_x) / (0.85 * anat.lung_ax)) ** 2
         + ((y - (anat.lung_cy - 0.25 * anat.lung_by)) / (0.75 * anat.lung_by)) ** 2)
    return anat.z_base + dome * np.sqrt(np.clip(1.0 - q, 0.0, 1.0))


def cavity_2d(anat: Anatomy, y, x):
    """Inside the thoracic cavity ellipse (the inner surface of the chest wall)."""
    return ((x - anat.x0) / anat.cav_a) ** 2 + ((y - anat.cav_yc) / anat.cav_b) ** 2 < 1.0


def lung_shape(anat: Anatomy, y, x, z):
    """True inside either lung (before the heart, vessels or findings are painted)."""
    dx = x - anat.x0
    centre_x = np.where(dx < 0, anat.lung_cx(-1), anat.lung_cx(1))
    in_plane = ((x - centre_x) / anat.lung_ax) ** 2 + ((y - anat.lung_cy) / anat.lung_by) ** 2
    paravertebral = ((dx / (anat.vb_r + 16)) ** 2 + ((y - anat.vb_y) / (1.5 * anat.vb_r)) ** 2 < 1.0
                     ) | ((np.abs(dx) < anat.vb_r + 16) & (y > anat.vb_y))
    # The mediastinum is narrow in front (anterior junction) and wider at the spine.
    depth = np.clip((y - anat.cav_front) / (2.0 * anat.cav_b), 0.0, 1.0)
    mediastinum = np.abs(dx) < anat.med_hw * (0.75 + 0.5 * depth)
    return (cavity_2d(anat, y, x) & ~mediastinum & ~paravertebral
            & (in_plane < lung_taper2(anat, z)) & (z > diaphragm_z(anat, y, x)))


def lobe_of(anat: Anatomy, point) -> str:
    """The lobe holding `point` (y, x, z), e.g. "right upper lobe" or "lingula"."""
    y, x, z = point
    right = x < anat.x0
    hilum_z = anat.hila[0 if right else 1][2]
    if z > hilum_z + 15:
        return "right upper lobe" if right else "left upper lobe"
    if y < anat.lung_cy - 0.2 * anat.lung_by and z > anat.z_base + 20:
        return "right middle lobe" if right else "lingula"
    return "right lower lobe" if right else "left lower lobe"


# ----------------------------------------------------------------------------------
# Rasterisation
# ----------------------------------------------------------------------------------


def _paint_body(canvas: Canvas, anat: Anatomy, y2, x2) -> np.ndarray:
    """Skin, subcutaneous fat, chest-wall muscle and the table; returns the body mask (H, W)."""
    def ellipse(shrink):
        return (((x2 - anat.x0) / (anat.body_a - shrink)) ** 2
                + ((y2 - anat.y0) / (anat.body_b - shrink)) ** 2 < 1.0)
    body = ellipse(0.0)
    canvas.hu[body] = SOFT_TISSUE_HU
    canvas.hu[ellipse(anat.skin_mm)] = FAT_HU
    canvas.hu[ellipse(anat.skin_mm + anat.fat_mm)] = MUSCLE_HU
    table_top = anat.y0 + anat.body_b + 6.0
    table = (y2 > table_top) & (y2 < table_top + 6.0) & (np.abs(x2 - anat.x0) < 220.0)
    canvas.hu[table] = 150.0
    return body


def _paint_cavity_and_abdomen(canvas: Canvas, anat: Anatomy, cavity2, y2, x2) -> None:
    """Mediastinal fat in the chest, soft tissue above the apex, organs below the diaphragm."""
    canvas.hu[cavity2] = FAT_HU + 10.0
    canvas.hu[:, :, _z_slice(canvas, anat.z_apex + 10.0, np.inf)][cavity2] = MUSCLE_HU - 5.0
    below = cavity2[:, :, None] & (canvas.z < diaphragm_z(anat, y2, x2)[:, :, None])
    canvas.hu[below] = 20.0
    canvas.hu[below & (canvas.x < anat.x0 + 20.0)] = 58.0  # liver
    cav_back = anat.cav_yc + anat.cav_b
    paint_ellipsoid(canvas, (cav_back - 35, anat.x0 + 0.7 * anat.cav_a, anat.z_base + 5),
                    (30, 22, 45), 48.0, where=below)  # spleen
    stomach = np.array([anat.cav_front + 45, anat.x0 + 0.45 * anat.cav_a,
                        anat.z_base + 0.5 * anat.dome_left])
    paint_ellipsoid(canvas, stomach, (35, 35, 35), 20.0, where=below)
    paint_ellipsoid(canvas, stomach, (35, 35, 35), -950.0,
                    where=below & (canvas.y < stomach[0] - 15.0))  # gas rises anteriorly


def _paint_lungs(canvas: Canvas, anat: Anatomy) -> np.ndarray:
    """Lung parenchyma with a soft texture and a gravity-dependent gradient."""
    lungs = lung_shape(anat, canvas.y, canvas.x, canvas.z)
    texture = lattice_field(anat.texture_seed, 10.0, *canvas.axes)
    dependent = 40.0 * (canvas.y - anat.lung_cy) / anat.lung_by  # supine: denser posteriorly
    values = LUNG_HU + 30.0 * texture + dependent
    canvas.hu[lungs] = np.broadcast_to(values, lungs.shape)[lungs]
    for points, radii in anat.vessels:
        paint_polyline(canvas, points, radii, SOFT_TISSUE_HU, where=lungs)
    canvas.masks["lungs"] = lungs
    return lungs


def paint_heart(canvas: Canvas, heart: Heart, where: np.ndarray) -> None:
    """Pericardium, epicardial fat (or pericardial fluid), myocardium and blood pool."""
    outer = heart.outer_scale
    pericardium = outer + 1.5 / float(np.mean(heart.semi_axes[:2]))
    rim_hu = heart.effusion_hu if heart.effusion_mm > 0 else FAT_HU
    for scale, value, record in ((pericardium, 30.0, "heart"), (outer, rim_hu, None),
                                 (1.0, 45.0, None), (0.8, 38.0, None)):
        paint_ellipsoid(canvas, heart.centre, heart.semi_axes * scale, value,
                        angle_xy=heart.angle_xy, where=where, record=record)


def paint_airways(canvas: Canvas, airways: list[Airway], where: np.ndarray) -> None:
    """Walls first, then every lumen, so that joints stay open."""
    for airway in airways:
        paint_polyline(canvas, airway.points, airway.lumen_mm + airway.wall_mm, SOFT_TISSUE_HU,
                       where=where, record="airway")
    for airway in airways:
        paint_polyline(canvas, airway.points, airway.lumen_mm, -1000.0, where=where)


def _paint_mediastinum(canvas: Canvas, anat: Anatomy, thorax: np.ndarray) -> None:
    paint_heart(canvas, anat.heart, thorax)
    paint_polyline(canvas, anat.aorta, anat.aorta_radii, 45.0, record="aorta")
    for points, radius in anat.pulmonary_arteries:
        paint_polyline(canvas, points, radius, 42.0, where=thorax)
    paint_polyline(canvas, anat.svc, 9.0, 40.0)
    paint_polyline(canvas, anat.esophagus, 7.0, SOFT_TISSUE_HU)
    paint_polyline(canvas, anat.esophagus, 2.0, -900.0)
    paint_airways(canvas, [anat.trachea] + anat.bronchi, thorax & ~canvas.masks["heart"])


def _paint_spine(canvas: Canvas, anat: Anatomy, y2, x2) -> None:
    dx, dy = x2 - anat.x0, y2 - anat.vb_y
    radius = np.hypot(dx, dy)
    body = radius < anat.vb_r
    canal_y = anat.vb_y + anat.vb_r + 9.0
    canal = np.hypot(dx, y2 - canal_y)
    arch = (canal < 14.0) & (canal >= 8.0) & (y2 > canal_y - 3.0)
    spinous = (np.abs(dx) < 4.0) & (y2 > canal_y + 10) & (y2 < canal_y + 34)
    transverse = (np.abs(y2 - canal_y + 3) < 4.0) & (np.abs(dx) > 8) & (np.abs(dx) < 30)
    bone = np.where(body, BONE_MARROW_HU, np.float32(np.nan))
    bone = np.where(body & (radius > anat.vb_r - 2.5), BONE_CORTEX_HU, bone)
    bone = np.where(arch | spinous | transverse, 700.0, bone)
    bone = np.where(canal < 8.0, 20.0, bone)  # spinal canal (CSF)
    rows, cols = np.nonzero(~np.isnan(bone))
    disc = ((canvas.axes[2] - anat.disc_phase) % anat.disc_period) < 6.0
    is_disc = body[rows, cols][:, None] & disc[None, :]
    canvas.hu[rows, cols, :] = np.where(is_disc, 85.0, bone[rows, cols][:, None])
    canvas.masks["bone"] = np.zeros(canvas.grid.shape, bool)
    canvas.masks["bone"][rows, cols, :] = ~is_disc & (canal[rows, cols] >= 8.0)[:, None]


def _z_slice(canvas: Canvas, lo: float, hi: float) -> slice:
    """Slices whose centre lies in (lo, hi) mm (z increases with the slice index)."""
    z = canvas.axes[2]
    return slice(int(np.searchsorted(z, lo, side="right")), int(np.searchsorted(z, hi)))


def _paint_ribs_and_sternum(canvas: Canvas, anat: Anatomy, y2, x2) -> None:
    """Ribs: bands in the chest wall that descend anteriorly; the sternum in front."""
    dx, dy = x2 - anat.x0, y2 - anat.cav_yc
    rho = np.sqrt((dx / anat.cav_a) ** 2 + (dy / anat.cav_b) ** 2)
    thickness = 10.0 / (0.5 * (anat.cav_a + anat.cav_b))
    ring = (rho > 1.02) & (rho < 1.02 + thickness)
    ring &= ~((np.abs(dx) < 35) & (dy < 0)) & ~((np.abs(dx) < anat.vb_r + 5) & (dy > 0))
    rows, cols = np.nonzero(ring)
    posterior = 0.5 + 0.5 * np.sin(np.arctan2(dy[rows, cols], dx[rows, cols]))
    shift = anat.rib_phase + anat.rib_slope * posterior
    z = canvas.axes[2]
    in_range = (z > anat.z_base - 40) & (z < anat.z_apex + 15)
    rib = (((z[None, :] - shift[:, None]) % anat.rib_period) < anat.rib_height) & in_range
    canvas.hu[rows, cols, :] = np.where(rib, RIB_HU, canvas.hu[rows, cols, :])
    canvas.masks["bone"][rows, cols, :] |= rib
    sternum = ((dx / 14.0) ** 2 + ((y2 - anat.cav_front + 6.0) / 6.0) ** 2) < 1.0
    z_range = _z_slice(canvas, anat.z_carina - 130, anat.z_apex - 15)
    canvas.hu[:, :, z_range][sternum] = 450.0
    canvas.masks["bone"][:, :, z_range][sternum] = True


def protected_mask(canvas: Canvas) -> np.ndarray:
    """Bone, aorta and airways: structures that findings of the mediastinum and pleura
    push aside rather than paint over."""
    return canvas.masks["bone"] | canvas.masks["aorta"] | canvas.masks["airway"]


def paint_anatomy(canvas: Canvas, anat: Anatomy) -> None:
    """Paints the normal chest and records the masks "body", "cavity", "thorax", "lungs",
    "parenchyma", "heart", "aorta", "airway" and "bone" in `canvas.masks`."""
    y2, x2 = np.broadcast_arrays(canvas.y[:, :, 0], canvas.x[:, :, 0])
    body = _paint_body(canvas, anat, y2, x2)
    cavity2 = cavity_2d(anat, y2, x2)
    _paint_cavity_and_abdomen(canvas, anat, cavity2, y2, x2)
    thorax = cavity2[:, :, None] & (canvas.z > diaphragm_z(anat, y2, x2)[:, :, None] - 8.0)
    lungs = _paint_lungs(canvas, anat)
    _paint_mediastinum(canvas, anat, thorax)
    _paint_spine(canvas, anat, y2, x2)
    _paint_ribs_and_sternum(canvas, anat, y2, x2)
    canvas.masks["body"] = np.broadcast_to(body[:, :, None], canvas.grid.shape)
    canvas.masks["cavity"] = np.broadcast_to(cavity2[:, :, None], canvas.grid.shape)
    canvas.masks["thorax"] = thorax
    canvas.masks["parenchyma"] = lungs & (canvas.hu < PARENCHYMA_MAX_HU)
    canvas.mask("heart")
    canvas.mask("aorta")
    canvas.mask("airway")
