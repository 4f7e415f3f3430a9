"""CT-CLIP volume preprocessing in pure numpy (no torch, no jax).

This reproduces the official CT-CLIP preprocessing (`nii_img_to_tensor` in the
CT-CLIP repository's ``scripts/data.py``), except that we store rounded int16
Hounsfield units at the target grid and normalise (``HU / 1000``) later, in the
input pipeline.  The steps, for one volume:

1. Load the NIfTI voxels (`load_nifti_dhw`).  nibabel returns the array with
   axes (i, j, k); the official code calls them (H, W, D) and transposes to
   (D, H, W) = (z, y, x) before resampling::

       nibabel array axis 2 (k) -> D (z, slices)
       nibabel array axis 0 (i) -> H (y, rows)
       nibabel array axis 1 (j) -> W (x, columns)

   so voxel ``array[i, j, k]`` ends up at ``volume_dhw[k, i, j]`` (before
   resampling moves it).  We follow this mapping exactly; it is a naming of the
   array axes, not a statement about patient orientation.
2. Convert to HU: ``slope * stored + intercept`` with RescaleSlope and
   RescaleIntercept from the metadata CSV (`to_hu`).  If the NIfTI header already
   carries a scaling (the re-headered files of CT-RATE v2), nibabel's scaling is
   the HU conversion and the CSV values must not be applied a second time.
3. Resample to the target spacing (z, y, x) = (1.5, 0.75, 0.75) mm with
   trilinear interpolation equal to ``torch.nn.functional.interpolate(
   mode="trilinear", align_corners=False, size=new_shape)`` (`resample_trilinear`),
   where ``new_shape[i] = int(shape[i] * (current[i] / target[i]))``
   (`resampled_shape`; the official code computes the ratio first).
4. Clip to the HU window [-1000, 1000] (`clip_hu`) and round to int16.
5. Centre crop or pad to (D, H, W) = (240, 480, 480) (`center_crop_or_pad`),
   padding with the window's lower bound (-1000 HU, which is the official -1
   after normalisation).  Step 3 computes only the voxels this crop keeps.

Volumes with fewer than `min_slices` slices or with NaN / infinite voxels are
rejected (`VolumeRejected`).  Everything runs in float32 and the resampling
works on bounded chunks, so the peak memory for one 512 x 512 x 300 volume is
under three float32 copies of it (the input and two resampling passes).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

# Elements (float32) per chunk when resampling one axis; bounds the temporaries.
_CHUNK_ELEMENTS = 1 << 22


class VolumeRejected(ValueError):
    """A volume that preprocessing refuses (too few slices, non-finite voxels, ...)."""


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Parameters of `preprocess_volume`; the defaults are the official CT-CLIP ones.

    Attributes:
      target_spacing_mm: (z, y, x) voxel spacing of the output in mm.
      target_shape: (D, H, W) of the output after centre crop / pad.
      hu_window: (low, high) HU clip window; padding uses `low`.
      min_slices: volumes with fewer original slices (D) are rejected.
      clip_before_resample: the official training loader clips *after*
        resampling (False, the default); its `data_inference_nii.py` clips before.
    """

    target_spacing_mm: tuple[float, float, float] = (1.5, 0.75, 0.75)
    target_shape: tuple[int, int, int] = (240, 480, 480)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    min_slices: int = 20
    clip_before_resample: bool = False

    def __post_init__(self):
        if len(self.target_spacing_mm) != 3 or min(self.target_spacing_mm) <= 0:
            raise ValueError(f"target_spacing_mm must be 3 positive values, "
                             f"got {self.target_spacing_mm}")
        if len(self.target_shape) != 3 or min(self.target_shape) <= 0:
            raise ValueError(f"target_shape must be 3 positive ints, got {self.target_shape}")
        low, high = self.hu_window
        if not low < high or low < -32768 or high > 32767:
            raise ValueError(f"hu_window must be (low, high) within int16, got {self.hu_window}")

    def to_dict(self) -> dict:
        """JSON-friendly form, as written into manifests."""
        return {
            "target_spacing_mm": [float(v) for v in self.target_spacing_mm],
            "target_shape": [int(v) for v in self.target_shape],
            "hu_window": [float(v) for v in self.hu_window],
            "min_slices": int(self.min_slices),
            "clip_before_resample": bool(self.clip_before_resample),
        }


# ----------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------


def to_hu(stored: np.ndarray, slope: float, intercept: float,
          out: np.ndarray | None = None) -> np.ndarray:
    """Hounsfield units ``slope * stored + intercept`` as float32, same shape.

    `out` may be `stored` itself (float32) to convert in place.
    """
    if out is None:
        out = np.array(stored, dtype=np.float32, copy=True)
    elif out is not stored:
        np.copyto(out, stored, casting="same_kind")
    if slope != 1:
        out *= np.float32(slope)
    if intercept != 0:
        out += np.float32(intercept)
    return out


def clip_hu(volume: np.ndarray, hu_window: Sequence[float] = (-1000.0, 1000.0),
            out: np.ndarray | None = None) -> np.ndarray:
    """Clips HU values to ``[low, high]``; pass ``out=volume`` to clip in place."""
    low, high = hu_window
    return np.clip(volume, low, high, out=out)


def resampled_shape(shape: Sequence[int], current_spacing: Sequence[float],
                    target_spacing: Sequence[float]) -> tuple[int, ...]:
    """Output shape of the resampling: ``int(shape * (current / target))`` per axis.

    The parentheses matter: the official code computes the spacing ratio first,
    and e.g. ``int(300 * (0.6 / 1.5)) == 119`` while ``int(300 * 0.6 / 1.5) == 120``.
    """
    if not len(shape) == len(current_spacing) == len(target_spacing):
        raise ValueError("shape, current_spacing and target_spacing need the same length")
    return tuple(int(n * (float(c) / float(t)))
                 for n, c, t in zip(shape, current_spacing, target_spacing))


def _linear_source_weights(in_size: int, out_size: int):
    """Neighbour indices and weights of 1-D linear interpolation, torch style.

    Mirrors ATen's CPU upsample kernel for align_corners=False with an explicit
    size: ``src = max((dst + 0.5) * in/out - 0.5, 0)``, ``i0 = floor(src)``,
    ``i1 = min(i0 + 1, in - 1)``, ``w1 = src - i0``, ``w0 = 1 - w1``.  The
    coordinates are computed in float64, as torch does for the official code's
    float64 tensors (float32 coordinates would shift values by ~1e-3 HU); the
    weights are then rounded to float32.  Returns (i0, i1, w0, w1), each of
    length `out_size`.
    """
    if in_size == out_size:  # torch copies in this case
        index = np.arange(out_size)
        return index, index, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    ratio = in_size / out_size
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * ratio - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0, 0.0, 1.0)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (1.0 - w1).astype(np.float32), w1.astype(np.float32)


def centre_window(size: int, target: int) -> slice:
    """The part of an axis of length `size` that a centre crop to `target` keeps.

    As the official code: start ``max((size - target) // 2, 0)``, at most
    `target` long.
    """
    start = max((size - target) // 2, 0)
    return slice(start, start + min(size - start, target))


def _resample_axis(volume: np.ndarray, axis: int, out_size: int,
                   keep: slice) -> np.ndarray:
    """Linear interpolation of a float32 3-D array along one axis, in chunks.

    Computes only the output indices in `keep` of the full `out_size` grid.
    The chunks run along another axis so that the gathered temporaries stay at
    about `_CHUNK_ELEMENTS` floats whatever the volume size.
    """
    i0, i1, w0, w1 = (a[keep] for a in _linear_source_weights(volume.shape[axis], out_size))
    out_shape = list(volume.shape)
    out_shape[axis] = len(i0)
    out = np.empty(out_shape, np.float32)
    weight_shape = [1, 1, 1]
    weight_shape[axis] = len(i0)
    w0, w1 = w0.reshape(weight_shape), w1.reshape(weight_shape)

    chunk_axis = 1 if axis == 0 else 0
    per_index = max(int(np.prod(out_shape)) // max(out_shape[chunk_axis], 1), 1)
    step = max(_CHUNK_ELEMENTS // per_index, 1)
    for start in range(0, volume.shape[chunk_axis], step):
        window = [slice(None)] * 3
        window[chunk_axis] = slice(start, start + step)
        source = volume[tuple(window)]
        low = np.take(source, i0, axis=axis)
        low *= w0
        high = np.take(source, i1, axis=axis)
        high *= w1
        low += high
        out[tuple(window)] = low
    return out


def resample_trilinear(volume_dhw: np.ndarray, current_spacing: Sequence[float],
                       target_spacing: Sequence[float],
                       crop_to: Sequence[int] | None = None) -> np.ndarray:
    """Resamples a [D, H, W] volume from `current_spacing` to `target_spacing` (mm).

    Equal (to float32 precision) to ``F.interpolate(x[None, None], size=new_shape,
    mode="trilinear", align_corners=False)`` with `new_shape` from `resampled_shape`.

    Args:
      crop_to: if given, return only the centred part of the resampled volume that
        `center_crop_or_pad(..., crop_to, ...)` would keep, without computing the
        rest (CT-CLIP crops 300-600 resampled slices to 240).

    Trilinear interpolation is separable, so we interpolate one axis at a time,
    the most shrinking axis first to keep the intermediate arrays small.
    Returns a new float32 array.
    """
    volume = np.asarray(volume_dhw, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"expected a [D, H, W] volume, got shape {volume.shape}")
    new_shape = resampled_shape(volume.shape, current_spacing, target_spacing)
    if min(new_shape) < 1:
        raise VolumeRejected(f"resampling shape {volume.shape} at spacing "
                             f"{tuple(current_spacing)} gives an empty volume {new_shape}")
    keep = [centre_window(n, t) for n, t in zip(new_shape, crop_to or new_shape)]
    kept_sizes = [k.stop - k.start for k in keep]
    result = volume
    for axis in sorted((2, 1, 0), key=lambda a: kept_sizes[a] / volume.shape[a]):
        if new_shape[axis] == volume.shape[axis]:  # torch copies: only crop
            index = [slice(None)] * 3
            index[axis] = keep[axis]
            result = result[tuple(index)]
        else:
            result = _resample_axis(result, axis, new_shape[axis], keep[axis])
    if np.shares_memory(result, volume_dhw):
        result = np.array(result, dtype=np.float32)
    return result


def center_crop_or_pad(volume: np.ndarray, target_shape: Sequence[int],
                       pad_value: float) -> np.ndarray:
    """Centre crops and/or pads every axis of `volume` to `target_shape`.

    Per axis, as the official code: crop start ``max((size - target) // 2, 0)``;
    pad before ``(target - kept) // 2`` and the rest after.  Keeps the dtype.
    """
    if volume.ndim != len(target_shape):
        raise ValueError(f"volume has {volume.ndim} axes, target_shape {len(target_shape)}")
    crop, place = [], []
    for size, target in zip(volume.shape, target_shape):
        kept = centre_window(size, target)
        before = (target - (kept.stop - kept.start)) // 2
        crop.append(kept)
        place.append(slice(before, before + kept.stop - kept.start))
    out = np.full(tuple(target_shape), pad_value, dtype=volume.dtype)
    out[tuple(place)] = volume[tuple(crop)]
    return out


# ----------------------------------------------------------------------------------
# Whole volume
# ----------------------------------------------------------------------------------


def to_dhw(volume: np.ndarray, layout: str) -> np.ndarray:
    """A [D, H, W] view of `volume` given its `layout`, "dhw" or "hwd" (nibabel's)."""
    if layout == "dhw":
        return volume
    if layout == "hwd":
        return np.transpose(volume, (2, 0, 1))
    raise ValueError(f"layout must be 'dhw' or 'hwd', got {layout!r}")


def preprocess_volume(volume: np.ndarray, slope: float, intercept: float,
                      spacing_zyx: Sequence[float], config: PreprocessConfig = PreprocessConfig(),
                      *, layout: str = "dhw", overwrite_input: bool = False) -> np.ndarray:
    """Stored voxels -> int16 HU [D, H, W] at the target grid (see the module docstring).

    Args:
      volume: stored voxel values, [D, H, W] (layout "dhw", what `load_nifti_dhw`
        returns) or nibabel's [H, W, D] (layout "hwd").
      slope, intercept: HU = slope * stored + intercept (1, 0 for HU input).
      spacing_zyx: the input's (z, y, x) voxel spacing in mm.
      config: target grid and HU window.
      overwrite_input: allow the HU conversion to reuse `volume`'s memory when it
        is a float32 array (saves one full copy in preparation workers).

    Returns:
      int16[config.target_shape] HU, clipped to `config.hu_window`, rounded half
      to even, padded with the window's lower bound.

    Raises:
      VolumeRejected: fewer than `config.min_slices` slices or non-finite voxels.
    """
    volume_dhw = to_dhw(np.asarray(volume), layout)
    if volume_dhw.ndim != 3:
        raise VolumeRejected(f"expected a 3-D volume, got shape {volume_dhw.shape}")
    if volume_dhw.shape[0] < config.min_slices:
        raise VolumeRejected(f"only {volume_dhw.shape[0]} slices, fewer than "
                             f"min_slices={config.min_slices}")
    # A float64 sum streams through the array without a full-size temporary.
    if not np.isfinite(np.sum(volume_dhw, dtype=np.float64)):
        raise VolumeRejected("volume contains NaN or infinite voxels")

    reuse = overwrite_input and volume_dhw.dtype == np.float32
    hu = to_hu(volume_dhw, slope, intercept, out=volume_dhw if reuse else None)
    if config.clip_before_resample:
        clip_hu(hu, config.hu_window, out=hu)
    # Voxels that the final centre crop drops are never computed.
    hu = resample_trilinear(hu, spacing_zyx, config.target_spacing_mm,
                            crop_to=config.target_shape)
    clip_hu(hu, config.hu_window, out=hu)
    np.rint(hu, out=hu)
    return center_crop_or_pad(hu.astype(np.int16), config.target_shape,
                              pad_value=int(round(config.hu_window[0])))


# ----------------------------------------------------------------------------------
# NIfTI
# ----------------------------------------------------------------------------------


class LoadedVolume(NamedTuple):
    """What `load_nifti_dhw` returns (unpacks as a 3-tuple).

    volume_dhw: float32[D, H, W], C-contiguous; nibabel's scaling applied if any.
    header_spacing_zyx: (z, y, x) mm from the header's pixdim (may disagree with
      the metadata CSV in the original release; preparation uses the CSV).
    header_scaling_applied: True when the header's scl_slope/scl_inter were
      applied, i.e. the values are already HU and the CSV RescaleSlope /
      RescaleIntercept must not be applied again.
    """

    volume_dhw: np.ndarray
    header_spacing_zyx: tuple[float, float, float]
    header_scaling_applied: bool


def load_nifti_dhw(path: str) -> LoadedVolume:
    """Reads a NIfTI volume as float32 [D, H, W] (mapping in the module docstring).

    Reads the stored dtype (e.g. int16), then casts and transposes it in one pass
    into a C-contiguous float32 array, so no float64 copy is ever made.  Header
    scaling (scl_slope, scl_inter), when present, is applied as nibabel's
    `get_fdata` would, and reported in `header_scaling_applied`.
    """
    import nibabel as nib  # imported here so that the numpy parts load without it

    image = nib.load(str(path))
    proxy = image.dataobj
    if hasattr(proxy, "get_unscaled"):
        stored = np.asanyarray(proxy.get_unscaled())
        slope, intercept = float(proxy.slope), float(proxy.inter)
    else:  # an in-memory image: its array is already scaled
        stored = np.asanyarray(proxy)
        slope, intercept = 1.0, 0.0
    if stored.ndim == 4 and stored.shape[3] == 1:
        stored = stored[..., 0]
    if stored.ndim != 3:
        raise VolumeRejected(f"expected a 3-D NIfTI volume, got shape {stored.shape}")

    volume_dhw = np.empty((stored.shape[2], stored.shape[0], stored.shape[1]), np.float32)
    np.copyto(volume_dhw, np.transpose(stored, (2, 0, 1)), casting="unsafe")
    del stored
    header_scaling_applied = not (slope == 1.0 and intercept == 0.0)
    if header_scaling_applied:
        to_hu(volume_dhw, slope, intercept, out=volume_dhw)

    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    zooms += [1.0] * (3 - len(zooms))
    return LoadedVolume(volume_dhw, (zooms[2], zooms[0], zooms[1]), header_scaling_applied)
