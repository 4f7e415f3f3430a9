"""Optional training-time volume augmentation: random crop, flips, intensity jitter.

Off by default (the official CT-CLIP trainer augments nothing).  Each draw comes
from the rng Grain's `random_map` hands to `input_pipeline.RecordToExample`,
which Grain derives from the pipeline seed and the element's position in the
stream: a given seed gives the same augmentation of the same record at the same
step in every run (and after a resume), and another one in the next epoch.

Order, chosen so that the expensive part (normalising to float32) touches only
the kept voxels:

1. crop (int16 HU): a `crop_shape` window at a uniformly random offset; at
   evaluation the centred window (`centre_crop`), so shapes match.
2. flips (int16 HU): each axis in `flip_axes` reversed with probability 1/2.
   Axes are (0, 1, 2) = (D, H, W).  A left-right flip (W) swaps the patient's
   sides, which chest findings are not symmetric about; it is not a default.
3. normalise to [-1, 1] (`input_pipeline.normalise_hu`).
4. intensity jitter (float32): ``x * (1 + a) + b`` with a ~ U(-scale, scale),
   b ~ U(-shift, shift) in normalised units (0.1 is 100 HU with the default
   window), then clipped back to [-1, 1].

The input pipeline makes all draws per example (`VolumeAugmentation.draw`: an
int16 view and the jitter's scale and shift) and does steps 3-4 as it writes
the batch (`input_pipeline.BatchExamples`), bitwise as `VolumeAugmentation.__call__`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class VolumeAugmentation:
    """Augmentation settings; the defaults change nothing.

    Attributes:
      crop_shape: (D, H, W) of a random crop (centre crop at evaluation), at most
        the stored shape; None keeps the stored shape.
      flip_axes: axes of (D, H, W) flipped, each with probability 1/2.
      intensity_scale: half-width of the random contrast factor around 1.
      intensity_shift: half-width of the random offset, in normalised units.
    """

    crop_shape: tuple[int, int, int] | None = None
    flip_axes: tuple[int, ...] = ()
    intensity_scale: float = 0.0
    intensity_shift: float = 0.0

    def __post_init__(self):
        if self.crop_shape is not None and (len(self.crop_shape) != 3
                                            or min(self.crop_shape) < 1):
            raise ValueError(f"crop_shape must be 3 positive ints, got {self.crop_shape}")
        if any(axis not in (0, 1, 2) for axis in self.flip_axes):
            raise ValueError(f"flip_axes must be among (0, 1, 2) = (D, H, W), "
                             f"got {self.flip_axes}")
        if not 0 <= self.intensity_scale < 1 or self.intensity_shift < 0:
            raise ValueError(f"intensity_scale must be in [0, 1) and intensity_shift >= 0, "
                             f"got {self.intensity_scale}, {self.intensity_shift}")

    @property
    def active(self) -> bool:
        return bool(self.crop_shape or self.flip_axes or self.intensity_scale
                    or self.intensity_shift)

    def _windows(self, shape, offsets) -> tuple[slice, ...]:
        for size, target in zip(shape, self.crop_shape):
            if target > size:
                raise ValueError(f"crop_shape {self.crop_shape} is larger than the stored "
                                 f"volume {tuple(shape)}")
        return tuple(slice(o, o + t) for o, t in zip(offsets, self.crop_shape))

    def centre_crop(self, volume_hu: np.ndarray) -> np.ndarray:
        """The evaluation view: the centred `crop_shape` window (or the volume itself)."""
        if self.crop_shape is None:
            return volume_hu
        offsets = [(s - t) // 2 for s, t in zip(volume_hu.shape, self.crop_shape)]
        return volume_hu[self._windows(volume_hu.shape, offsets)]

    def __call__(self, volume_hu: np.ndarray, rng: np.random.Generator,
                 normalise: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """int16[D, H, W] HU -> float32[crop or D, H, W] normalised and augmented."""
        view, jitter = self.draw(volume_hu, rng)
        volume = normalise(view)
        if jitter is not None:
            apply_intensity_jitter(volume, jitter)
        return volume

    def draw(self, volume_hu: np.ndarray, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray | None]:
        """All random draws for one volume, in the order `__call__` makes them.

        Returns (int16 view of `volume_hu` cropped and flipped: no voxel is copied,
        float32[2] (scale, shift) of the intensity jitter or None), so that the
        pipeline can normalise the view straight into its batch buffer and jitter
        it there (`apply_intensity_jitter`), bitwise as `__call__` does.
        """
        view = volume_hu
        if self.crop_shape is not None:
            offsets = [int(rng.integers(0, max(s - t, 0) + 1))
                       for s, t in zip(volume_hu.shape, self.crop_shape)]
            view = view[self._windows(volume_hu.shape, offsets)]
        for axis in self.flip_axes:
            if rng.random() < 0.5:
                view = np.flip(view, axis)
        if not (self.intensity_scale or self.intensity_shift):
            return view, None
        scale = 1.0 + rng.uniform(-self.intensity_scale, self.intensity_scale)
        shift = rng.uniform(-self.intensity_shift, self.intensity_shift)
        return view, np.array([scale, shift], np.float32)


def apply_intensity_jitter(volume: np.ndarray, scale_shift: np.ndarray) -> np.ndarray:
    """In place: float32 ``volume * scale + shift`` clipped to [-1, 1]; returns `volume`."""
    volume *= scale_shift[0]
    volume += scale_shift[1]
    np.clip(volume, -1.0, 1.0, out=volume)
    return volume
