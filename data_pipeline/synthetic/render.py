"""From labels to a HU volume: a scan plan (anatomy + findings) rasterised on a grid.

The plan is small (a few KB of floats) and independent of the grid, so the two
reconstructions of one scan are the same chest sampled at two spacings.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline.schema import ABNORMALITIES, NUM_ABNORMALITIES
from data_pipeline.synthetic.abnormalities import PAINT_ORDER, RENDERERS, Params, draw_findings
from data_pipeline.synthetic.anatomy import Anatomy, draw_anatomy, paint_anatomy
from data_pipeline.synthetic.canvas import Canvas, Grid
from data_pipeline.synthetic.conspicuity import REALISTIC

# The HU range a 12-bit CT reconstruction can hold.
HU_MIN, HU_MAX = -1024.0, 3071.0
NOISE_SIGMA_RANGE = (10.0, 20.0)


@dataclasses.dataclass
class ScanPlan:
    """Everything random about one scan except the voxel noise."""

    anatomy: Anatomy
    findings: dict[str, Params]

    def details(self, name: str) -> dict:
        """Report details of a finding (side, lobe, size_mm, device, ...)."""
        return dict(self.findings[name].get("details", {}))


def draw_plan(rng: np.random.Generator, anatomy: Anatomy | None = None,
              conspicuity: float = REALISTIC) -> ScanPlan:
    """Draws the anatomy (unless given, e.g. for a patient's second scan) and the
    parameters of all 18 findings (exaggerated when `conspicuity` > 1)."""
    anatomy = draw_anatomy(rng) if anatomy is None else anatomy
    return ScanPlan(anatomy, draw_findings(rng, anatomy, conspicuity))


def _positives(labels) -> set[str]:
    labels = np.asarray(labels).reshape(-1)
    if labels.shape != (NUM_ABNORMALITIES,):
        raise ValueError(f"labels must hold {NUM_ABNORMALITIES} values in ABNORMALITIES order, "
                         f"got shape {labels.shape}")
    return {name for name, value in zip(ABNORMALITIES, labels) if value > 0}


def effective_anatomy(plan: ScanPlan, labels) -> Anatomy:
    """The anatomy with the positive 'modifying' findings applied (cardiomegaly,
    pericardial effusion, peribronchial thickening)."""
    anatomy = plan.anatomy
    for name in ABNORMALITIES:
        modify = RENDERERS[name].modify
        if modify is not None and name in _positives(labels):
            anatomy = modify(anatomy, plan.findings[name])
    return anatomy


def rasterize(plan: ScanPlan, labels, grid: Grid) -> Canvas:
    """Paints the noiseless chest with the positive findings of `labels` (18 values)."""
    positives = _positives(labels)
    anatomy = effective_anatomy(plan, labels)
    canvas = Canvas(grid)
    paint_anatomy(canvas, anatomy)
    for name in PAINT_ORDER:
        if name in positives:
            RENDERERS[name].paint(canvas, anatomy, plan.findings[name])
    return canvas


def add_noise_and_clip(hu: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Adds white Gaussian noise of `sigma` HU in place and clips to the 12-bit HU range."""
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(sigma)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return hu


def render_volume(labels, rng: np.random.Generator, shape, spacing_mm, *,
                  noise_sigma: float | None = None, return_masks: bool = False,
                  conspicuity: float = REALISTIC):
    """Renders one random chest CT with the given abnormalities.

    Args:
      labels: 18 values (0/1) in `ABNORMALITIES` order.
      rng: source of all randomness (anatomy, findings, noise).  The stream does not
        depend on `labels`, so the same seed renders the same patient with and without
        a finding.
      shape: (H, W, D) = (rows anterior->posterior, columns patient right->left,
        slices inferior->superior), the layout of `nib.load(p).get_fdata()`.
      spacing_mm: (row, column, slice) spacing in mm.
      noise_sigma: HU of the white noise; drawn from 10-20 HU when None.
      return_masks: also return the canvas masks ("body", "lungs", "parenchyma",
        "heart", "aorta", "bone", ...) as bool[H, W, D].
      conspicuity: 1.0 renders realistic findings; larger values exaggerate them
        (size, extent, number, contrast; docs/synthetic_data.md).

    Returns:
      float32[H, W, D] HU clipped to [-1024, 3071], or (volume, masks).
    """
    grid = Grid(tuple(int(n) for n in shape), tuple(float(s) for s in spacing_mm))
    plan = draw_plan(rng, conspicuity=conspicuity)
    sigma = rng.uniform(*NOISE_SIGMA_RANGE) if noise_sigma is None else noise_sigma
    canvas = rasterize(plan, labels, grid)
    volume = add_noise_and_clip(canvas.hu, rng, sigma)
    if return_masks:
        return volume, canvas.masks
    return volume
