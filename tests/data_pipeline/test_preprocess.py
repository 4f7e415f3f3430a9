"""Tests of data_pipeline.preprocess against torch and the official CT-CLIP rules."""

from __future__ import annotations

import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from data_pipeline import preprocess
from data_pipeline.preprocess import (
    PreprocessConfig,
    VolumeRejected,
    center_crop_or_pad,
    clip_hu,
    load_nifti_dhw,
    preprocess_volume,
    resample_trilinear,
    resampled_shape,
    to_hu,
)


def write_nifti(path, stored_hwd, spacing_zyx=(1.0, 1.0, 1.0), slope_inter=None):
    """Writes nibabel-layout [H, W, D] voxels; `slope_inter` sets header scaling."""
    z, y, x = spacing_zyx
    image = nib.Nifti1Image(stored_hwd, np.diag([y, x, z, 1.0]))
    if slope_inter is not None:
        image.header.set_slope_inter(*slope_inter)
    nib.save(image, str(path))
    return str(path)


def official_crop_or_pad(volume, target_shape, pad_value):
    """The official per-axis crop/pad arithmetic, written out independently."""
    for axis, target in enumerate(target_shape):
        size = volume.shape[axis]
        start = max((size - target) // 2, 0)
        end = min(start + target, size)
        volume = np.take(volume, np.arange(start, end), axis=axis)
        before = (target - volume.shape[axis]) // 2
        after = target - volume.shape[axis] - before
        widths = [(0, 0)] * volume.ndim
        widths[axis] = (before, after)
        volume = np.pad(volume, widths, constant_values=pad_value)
    return volume


# ----------------------------------------------------------------------------------
# Resampling
# ----------------------------------------------------------------------------------

RESAMPLE_CASES = [
    # (input shape, current spacing, target spacing)
    ((6, 8, 10), (3.0, 1.5, 1.5), (1.5, 0.75, 0.75)),  # integer upsampling
    ((20, 24, 28), (0.75, 0.375, 0.375), (1.5, 0.75, 0.75)),  # integer downsampling
    ((11, 13, 17), (1.25, 0.7, 0.82), (1.5, 0.75, 0.75)),  # non-integer, mixed
    ((7, 9, 5), (5.0, 0.6, 0.9), (1.5, 0.75, 0.75)),  # strong z upsampling
    ((9, 10, 11), (1.5, 0.75, 0.75), (1.5, 0.75, 0.75)),  # identity
]


@pytest.mark.torch
@pytest.mark.parametrize("shape, current, target", RESAMPLE_CASES)
def test_resample_matches_torch_trilinear(shape, current, target):
    # The official code interpolates float64 tensors; we match that to float32 precision.
    torch = pytest.importorskip("torch")
    volume = np.random.default_rng(0).uniform(-1200, 1500, shape).astype(np.float32)
    new_shape = resampled_shape(shape, current, target)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(volume.astype(np.float64))[None, None], size=new_shape,
        mode="trilinear", align_corners=False)[0, 0].numpy()
    result = resample_trilinear(volume, current, target)
    assert result.dtype == np.float32 and result.shape == new_shape
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("shape, current, crop_to", [
    ((30, 20, 22), (2.0, 0.9, 0.6), (24, 16, 40)),  # crop z and y, pad x
    ((15, 9, 9), (1.5, 0.75, 0.75), (10, 5, 9)),  # no resampling, crop only
])
def test_resample_crop_to_equals_crop_of_full_resample(shape, current, crop_to):
    volume = np.random.default_rng(6).uniform(-1000, 1000, shape).astype(np.float32)
    full = resample_trilinear(volume, current, (1.5, 0.75, 0.75))
    cropped = resample_trilinear(volume, current, (1.5, 0.75, 0.75), crop_to=crop_to)
    assert not np.shares_memory(cropped, volume)
    expected = center_crop_or_pad(full, crop_to, pad_value=np.nan)
    np.testing.assert_allclose(center_crop_or_pad(cropped, crop_to, pad_value=np.nan),
                               expected, rtol=1e-6, atol=1e-4)


def official_pipeline(stored_hwd, slope, intercept, z_spacing, xy_spacing, torch):
    """The official CT-CLIP steps in torch float64, returning float [D, H, W] in [-1, 1]."""
    data = (slope * stored_hwd.astype(np.float64) + intercept).transpose(2, 0, 1)
    current, target = (z_spacing, xy_spacing, xy_spacing), (1.5, 0.75, 0.75)
    size = [int(data.shape[i] * (current[i] / target[i])) for i in range(3)]
    data = torch.nn.functional.interpolate(torch.from_numpy(data)[None, None], size=size,
                                           mode="trilinear", align_corners=False)[0, 0]
    data = np.clip(data.numpy().transpose(1, 2, 0), -1000, 1000) / 1000
    data = official_crop_or_pad(data, (48, 40, 24), pad_value=-1)  # (H, W, D)
    return data.transpose(2, 0, 1)


@pytest.mark.torch
def test_preprocess_volume_matches_official_pipeline():
    torch = pytest.importorskip("torch")
    stored = np.random.default_rng(7).integers(0, 2500, (50, 36, 30)).astype(np.int16)
    config = PreprocessConfig(target_shape=(24, 48, 40))
    ours = preprocess_volume(stored, 1.0, -1024.0, (1.25, 0.7, 0.7), config, layout="hwd")
    official = official_pipeline(stored, 1.0, -1024.0, 1.25, 0.7, torch)
    assert ours.shape == official.shape
    # int16 HU are the official values * 1000, rounded.
    assert np.abs(ours - official * 1000).max() <= 0.5 + 1e-3


def test_resampled_shape_follows_official_rule():
    # int(shape * (current / target)), the ratio first as in the official code.
    assert resampled_shape((300, 512, 512), (0.6, 0.7, 0.7), (1.5, 0.75, 0.75)) == (
        119, 477, 477)
    assert resampled_shape((100, 512, 512), (1.0, 0.75, 0.75), (1.5, 0.75, 0.75)) == (
        66, 512, 512)
    assert resample_trilinear(np.zeros((100, 8, 8), np.float32), (1.0, 0.75, 0.75),
                              (1.5, 0.75, 0.75)).shape == (66, 8, 8)


def test_resample_keeps_memory_bounded(monkeypatch):
    monkeypatch.setattr(preprocess, "_CHUNK_ELEMENTS", 1 << 14)
    volume = np.random.default_rng(1).normal(size=(40, 64, 64)).astype(np.float32)
    tracemalloc.start()
    try:
        result = resample_trilinear(volume, (1.4, 0.8, 0.8), (1.5, 0.75, 0.75))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # About two float32 volumes (one pass's input and output) plus small chunks;
    # a float64 copy of the input would take the peak past 5x.
    assert peak < 3 * result.nbytes


# ----------------------------------------------------------------------------------
# HU, clipping, crop / pad
# ----------------------------------------------------------------------------------


def test_hu_round_trip_is_exact_for_integer_input():
    rng = np.random.default_rng(2)
    stored = rng.integers(0, 4096, size=(24, 10, 12), dtype=np.int16)
    config = PreprocessConfig(target_spacing_mm=(2.0, 1.0, 1.0), target_shape=(24, 10, 12),
                              hu_window=(-2000, 4000), min_slices=1)
    result = preprocess_volume(stored, 1.0, -1024.0, (2.0, 1.0, 1.0), config)
    assert result.dtype == np.int16
    np.testing.assert_array_equal(result, stored.astype(np.int32) - 1024)
    np.testing.assert_array_equal(to_hu(stored, 2.0, -1000.0), stored * 2.0 - 1000.0)


def test_clip_hu_and_window_of_preprocessed_volume():
    values = np.array([-3000.0, -1000.0, 0.0, 999.6, 5000.0], np.float32)
    np.testing.assert_array_equal(clip_hu(values),
                                  np.array([-1000, -1000, 0, 999.6, 1000], np.float32))
    stored = np.random.default_rng(3).integers(-3000, 3000, (30, 8, 8)).astype(np.int16)
    config = PreprocessConfig(target_spacing_mm=(1.0, 1.0, 1.0), target_shape=(32, 10, 6),
                              min_slices=1)
    result = preprocess_volume(stored, 1.0, 0.0, (1.0, 1.0, 1.0), config)
    assert result.min() == -1000 and result.max() == 1000
    assert (result[0] == -1000).all()  # padding is the window's lower bound


@pytest.mark.parametrize("shape, target", [
    ((5, 6, 7), (3, 8, 4)),  # crop by 2, pad by 2, crop by 3
    ((4, 9, 8), (7, 6, 8)),  # pad by 3 (odd), crop by 3 (odd), unchanged
    ((2, 2, 2), (5, 4, 1)),
])
def test_center_crop_or_pad_is_centred(shape, target):
    volume = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    result = center_crop_or_pad(volume, target, pad_value=-1000)
    assert result.shape == target and result.dtype == np.int16
    np.testing.assert_array_equal(result, official_crop_or_pad(volume, target, -1000))


def test_center_crop_or_pad_odd_difference_pads_more_after():
    result = center_crop_or_pad(np.ones((1, 1, 1), np.int16), (1, 1, 4), pad_value=0)
    np.testing.assert_array_equal(result[0, 0], [0, 1, 0, 0])
    cropped = center_crop_or_pad(np.arange(5, dtype=np.int16).reshape(1, 1, 5), (1, 1, 2), 0)
    np.testing.assert_array_equal(cropped[0, 0], [1, 2])


# ----------------------------------------------------------------------------------
# Rejections
# ----------------------------------------------------------------------------------


def test_too_few_slices_are_rejected():
    with pytest.raises(VolumeRejected, match="min_slices=20"):
        preprocess_volume(np.zeros((19, 8, 8), np.int16), 1.0, 0.0, (1.5, 0.75, 0.75))


def test_non_finite_voxels_are_rejected():
    volume = np.zeros((25, 4, 4), np.float32)
    volume[3, 2, 1] = np.nan
    with pytest.raises(VolumeRejected, match="NaN"):
        preprocess_volume(volume, 1.0, 0.0, (1.5, 0.75, 0.75))


# ----------------------------------------------------------------------------------
# NIfTI loading and orientation
# ----------------------------------------------------------------------------------


def test_load_nifti_without_header_scaling(tmp_path):
    stored = np.random.default_rng(4).integers(-100, 3000, (6, 7, 8)).astype(np.int16)
    path = write_nifti(tmp_path / "plain.nii.gz", stored, spacing_zyx=(2.5, 0.7, 0.8))
    volume, spacing, scaled = load_nifti_dhw(path)
    assert not scaled
    assert volume.dtype == np.float32 and volume.flags.c_contiguous
    assert spacing == pytest.approx((2.5, 0.7, 0.8))
    np.testing.assert_array_equal(volume, stored.transpose(2, 0, 1))


def test_header_scaled_nifti_is_not_rescaled_twice(tmp_path):
    stored = np.random.default_rng(5).integers(0, 3000, (6, 7, 30)).astype(np.int16)
    path = write_nifti(tmp_path / "fixed.nii.gz", stored, slope_inter=(1.0, -1024.0))
    volume, _, scaled = load_nifti_dhw(path)
    assert scaled
    np.testing.assert_array_equal(volume, stored.transpose(2, 0, 1) - 1024.0)
    # What preparation does: HU already, so slope 1 and intercept 0.
    config = PreprocessConfig(target_spacing_mm=(1.0, 1.0, 1.0), target_shape=(30, 6, 7),
                              hu_window=(-2000, 4000))
    result = preprocess_volume(volume, 1.0, 0.0, (1.0, 1.0, 1.0), config)
    np.testing.assert_array_equal(result, stored.transpose(2, 0, 1).astype(np.int32) - 1024)


def test_orientation_marker_maps_i_j_k_to_k_i_j(tmp_path):
    i, j, k = 1, 4, 5
    stored = np.zeros((6, 7, 8), np.int16)  # nibabel [H, W, D]
    stored[i, j, k] = 1000
    path = write_nifti(tmp_path / "marker.nii.gz", stored)
    volume, _, _ = load_nifti_dhw(path)
    assert volume.shape == (8, 6, 7)
    assert tuple(np.argwhere(volume == 1000)[0]) == (k, i, j)

    # Upsampling by 2 puts the marker's peak at 2k or 2k + 1 on each axis.
    config = PreprocessConfig(target_spacing_mm=(0.5, 0.5, 0.5), target_shape=(16, 12, 14),
                              min_slices=1)
    result = preprocess_volume(volume, 1.0, 0.0, (1.0, 1.0, 1.0), config)
    peak = np.argwhere(result == result.max())
    assert set(map(tuple, peak)) == {(d, h, w) for d in (2 * k, 2 * k + 1)
                                     for h in (2 * i, 2 * i + 1) for w in (2 * j, 2 * j + 1)}
    from_hwd = preprocess_volume(stored, 1.0, 0.0, (1.0, 1.0, 1.0), config, layout="hwd")
    np.testing.assert_array_equal(from_hwd, result)


def test_preprocess_does_not_modify_input_unless_allowed():
    volume = np.full((20, 4, 4), 100.0, np.float32)
    config = PreprocessConfig(target_spacing_mm=(1.0, 1.0, 1.0), target_shape=(20, 4, 4))
    preprocess_volume(volume, 2.0, -50.0, (1.0, 1.0, 1.0), config)
    assert (volume == 100.0).all()
    result = preprocess_volume(volume, 2.0, -50.0, (1.0, 1.0, 1.0), config,
                               overwrite_input=True)
    assert (result == 150).all()
