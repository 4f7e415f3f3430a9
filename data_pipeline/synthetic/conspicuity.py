"""How conspicuous the rendered findings are.

`conspicuity` = 1.0 renders every finding at realistic size, extent, number and
contrast.  Larger values exaggerate all of them (bigger nodules, more plaques, thicker
walls, denser or darker lung) so that a small model trained for a few minutes on the
coarse demo grid (5.6 x 5.6 x 11.25 mm voxels, HU clipped to +-1000) can learn every
label.  The draw functions of the findings apply these helpers to their realistic
parameters; each one returns its input unchanged (bit for bit) at 1.0, so realistic
releases keep their bytes.
"""

from __future__ import annotations

import numpy as np

REALISTIC = 1.0
# What the CPU demo renders (experiments/configs/demo.gin; docs/synthetic_data.md).
DEMO_CONSPICUITY = 2.5


def check_conspicuity(conspicuity: float) -> float:
    """`conspicuity` as a float; values below 1 (less than realistic) are refused."""
    value = float(conspicuity)
    if not np.isfinite(value) or value < REALISTIC:
        raise ValueError(f"conspicuity must be a finite number >= 1, got {conspicuity}")
    return value


def grow(conspicuity: float, exponent: float) -> float:
    """Size factor conspicuity ** exponent (exactly 1.0 when realistic)."""
    return float(conspicuity) ** exponent


def toward(value, target, conspicuity: float):
    """`value` moved towards `target` by the fraction 1 - 1/conspicuity: unchanged when
    realistic, half way at 2, approaching `target` but never passing it."""
    return value + (target - value) * (1.0 - 1.0 / float(conspicuity))


def more(count: int, conspicuity: float, exponent: float = 1.0) -> int:
    """A count scaled by conspicuity ** exponent and rounded (unchanged when realistic)."""
    return int(round(count * grow(conspicuity, exponent)))


def exaggerated(conspicuity: float) -> bool:
    """Whether the rendering departs from realism (switches on purely didactic changes,
    such as keeping both hilar lymph-node stations)."""
    return float(conspicuity) > REALISTIC


def extra(per_unit: float, conspicuity: float) -> int:
    """How many items to add: `per_unit` for each unit of conspicuity above 1, rounded
    (0 when realistic)."""
    return int(round(per_unit * (float(conspicuity) - REALISTIC)))
