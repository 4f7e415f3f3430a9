"""A voxel grid in physical units and the painting primitives the phantom is built from.

Every structure of the phantom is defined in millimetres relative to the centre of the
volume, so it looks the same whatever the matrix and spacing.  Physical points are
written ``(y, x, z)`` in mm, in the same order as the array axes:

* ``y`` (axis 0, rows): anterior -> posterior,
* ``x`` (axis 1, columns): patient right -> patient left,
* ``z`` (axis 2, slices): inferior -> superior.

Painting works on the smallest index box that holds a structure, so small structures
cost little even on a 512 x 512 x 300 grid.
"""

from __future__ import annotations

import dataclasses

import numpy as np

AIR_HU = -1000.0

# Random lattices for texture fields cover this many mm either side of the volume centre
# on each axis (enough for a 512 x 0.8 mm field of view); beyond it the edge values repeat.
_LATTICE_EXTENT_MM = 320.0


@dataclasses.dataclass(frozen=True)
class Grid:
    """Shape (H, W, D) of a volume and its voxel spacing (row, column, slice) in mm."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]

    def axis_mm(self, axis: int) -> np.ndarray:
        """float32[n] voxel-centre coordinates along `axis`, 0 at the volume centre."""
        n = self.shape[axis]
        return ((np.arange(n, dtype=np.float32) - (n - 1) / 2.0)
                * np.float32(self.spacing_mm[axis]))


class Canvas:
    """The HU volume being painted plus its coordinate vectors and named masks.

    Attributes:
      grid: the voxel grid.
      hu: float32[H, W, D] Hounsfield units, initialised to air.
      y, x, z: float32 coordinates broadcastable to (H, W, D): shapes (H,1,1), (1,W,1), (1,1,D).
      masks: bool[H, W, D] arrays recorded while painting ("bone", "aorta", ...).
    """

    def __init__(self, grid: Grid):
        self.grid = grid
        self.axes = tuple(grid.axis_mm(a) for a in range(3))
        self.y = self.axes[0][:, None, None]
        self.x = self.axes[1][None, :, None]
        self.z = self.axes[2][None, None, :]
        self.hu = np.full(grid.shape, AIR_HU, np.float32)
        self.masks: dict[str, np.ndarray] = {}

    def mask(self, name: str) -> np.ndarray:
        """The named mask, created empty on first use."""
        if name not in self.masks:
            self.masks[name] = np.zeros(self.grid.shape, bool)
        return self.masks[name]

    def box(self, lo, hi):
        """Index box holding the physical box [lo, hi] (mm, (y, x, z)), or None if empty.

        Returns (slices, (y, x, z)) with the coordinates of the box broadcastable to
        its shape.
        """
        slices = []
        for axis in range(3):
            n = self.grid.shape[axis]
            step = self.grid.spacing_mm[axis]
            centre = (n - 1) / 2.0
            start = max(int(np.ceil(lo[axis] / step + centre)), 0)
            stop = min(int(np.floor(hi[axis] / step + centre)) + 1, n)
            if start >= stop:
                return None
            slices.append(slice(start, stop))
        coords = (self.axes[0][slices[0]][:, None, None],
                  self.axes[1][slices[1]][None, :, None],
                  self.axes[2][slices[2]][None, None, :])
        return tuple(slices), coords


def unit_vector(vector) -> np.ndarray:
    """`vector` scaled to length 1 (float64)."""
    vector = np.asarray(vector, np.float64)
    return vector / max(float(np.linalg.norm(vector)), 1e-9)


def _apply(canvas: Canvas, slices, inside, value, alpha, where, record) -> None:
    """Writes `value` (blended by `alpha`) where `inside` and `where` hold inside a box."""
    if where is not None:
        inside = inside & where[slices]
    if not inside.any():
        return
    target = canvas.hu[slices]
    if alpha >= 1.0:
        target[inside] = value
    else:
        target[inside] = target[inside] * np.float32(1.0 - alpha) + np.float32(alpha * value)
    if record is not None:
        canvas.mask(record)[slices] |= inside


def paint_polyline(canvas: Canvas, points, radius, value: float, *, alpha: float = 1.0,
                   where: np.ndarray | None = None, record: str | None = None) -> None:
    """Paints a tube of `radius` mm (scalar or one per point, tapering linearly)
    along the polyline `points` (N, 3) mm as a union of capsules."""
    points = np.asarray(points, np.float32).reshape(-1, 3)
    radii = np.broadcast_to(np.asarray(radius, np.float32), (len(points),))
    for i in range(len(points) - 1):
        p0, p1, r0, r1 = points[i], points[i + 1], radii[i], radii[i + 1]
        reach = max(r0, r1)
        found = canvas.box(np.minimum(p0, p1) - reach, np.maximum(p0, p1) + reach)
        if found is None:
            continue
        slices, (y, x, z) = found
        d = p1 - p0
        length2 = float(d @ d) or 1e-6
        t = ((y - p0[0]) * d[0] + (x - p0[1]) * d[1] + (z - p0[2]) * d[2]) / length2
        t = np.clip(t, 0.0, 1.0)
        dist2 = ((y - p0[0] - t * d[0]) ** 2 + (x - p0[1] - t * d[1]) ** 2
                 + (z - p0[2] - t * d[2]) ** 2)
        r = r0 + (r1 - r0) * t
        _apply(canvas, slices, dist2 < r * r, value, alpha, where, record)


def ellipsoid_radius2(coords, centre, semi_axes, angle_xy: float = 0.0):
    """Squared normalised radius of an ellipsoid (< 1 inside) at `coords` (y, x, z).

    `angle_xy` (radians) turns the ellipsoid in the axial plane: its second semi-axis
    then points along (y, x) = (sin a, cos a), e.g. a < 0 turns it towards
    left-anterior.
    """
    y, x, z = coords
    dy, dx, dz = y - centre[0], x - centre[1], z - centre[2]
    if angle_xy:
        c, s = np.float32(np.cos(angle_xy)), np.float32(np.sin(angle_xy))
        dy, dx = c * dy - s * dx, s * dy + c * dx
    return (dy / semi_axes[0]) ** 2 + (dx / semi_axes[1]) ** 2 + (dz / semi_axes[2]) ** 2


def ellipsoid_box(canvas: Canvas, centre, semi_axes):
    """Index box around an ellipsoid (any rotation), or None if it misses the grid."""
    reach = float(np.max(semi_axes))
    centre = np.asarray(centre, np.float32)
    return canvas.box(centre - reach, centre + reach)


def paint_ellipsoid(canvas: Canvas, centre, semi_axes, value: float, *, angle_xy: float = 0.0,
                    alpha: float = 1.0, where: np.ndarray | None = None,
                    record: str | None = None, shell: tuple[float, float] | None = None) -> None:
    """Paints an ellipsoid (semi-axes in mm, (y, x, z) order); with `shell=(lo, hi)` only
    the part whose normalised radius lies in [lo, hi)."""
    found = ellipsoid_box(canvas, centre, semi_axes)
    if found is None:
        return
    slices, coords = found
    rho2 = ellipsoid_radius2(coords, centre, semi_axes, angle_xy)
    inside = rho2 < 1.0 if shell is None else (rho2 >= shell[0] ** 2) & (rho2 < shell[1] ** 2)
    _apply(canvas, slices, inside, value, alpha, where, record)


def _lattice_weights(coords: np.ndarray, cell_mm: float, n: int):
    """Lower lattice index and smoothstep weight of the upper node per coordinate."""
    position = (coords.astype(np.float32) + _LATTICE_EXTENT_MM) / np.float32(cell_mm)
    index = np.clip(np.floor(position).astype(np.int64), 0, n - 2)
    weight = np.clip(position - index, 0.0, 1.0).astype(np.float32)
    return index, weight * weight * (3.0 - 2.0 * weight)  # smoothstep: no creases at nodes


def lattice_field(seed: int, cell_mm: float, y: np.ndarray, x: np.ndarray,
                  z: np.ndarray) -> np.ndarray:
    """A smooth random field fixed in physical space, sampled at 1-D coordinate vectors.

    Standard-normal values sit on a cubic lattice of `cell_mm` spacing and are
    interpolated (separable smoothstep) in between.  Returns float32[len(y), len(x),
    len(z)]; the same seed gives the same field at the same mm positions whatever the
    grid.
    """
    n = 2 * int(np.ceil(_LATTICE_EXTENT_MM / cell_mm)) + 2
    values = np.random.default_rng(seed).standard_normal((n, n, n), dtype=np.float32)
    for axis, coords in enumerate((y, x, z)):
        index, weight = _lattice_weights(np.ravel(coords), cell_mm, n)
        shape = [1, 1, 1]
        shape[axis] = len(weight)
        weight = weight.reshape(shape)
        values = (np.take(values, index, axis=axis) * (1.0 - weight)
                  + np.take(values, index + 1, axis=axis) * weight)
    return values
