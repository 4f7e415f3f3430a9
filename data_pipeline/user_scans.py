"""A user's own CT scans (NIfTI files or DICOM series), preprocessed without CT-RATE CSVs.

    for name, volume_hu, info in iter_user_volumes("/data/my_scans", PreprocessConfig()):
        ...  # volume_hu: int16[D, H, W] HU at the target grid, as in the shards

`path` may be a single ``.nii`` / ``.nii.gz`` file, a folder of NIfTI files, a
DICOM series folder, or a folder of series folders (searched recursively; a
folder holding several series gives one volume per SeriesInstanceUID).  Each
volume then goes through exactly the preprocessing of the CT-RATE shards
(`preprocess.preprocess_volume`: resample, clip, round, crop / pad).

HU and geometry come from the files' own headers:

* NIfTI: nibabel's scaling (``scl_slope`` / ``scl_inter``) when the header has
  one, otherwise the stored values are taken as HU; spacing from the header's
  pixdim; axes mapped to (D, H, W) as for CT-RATE (`preprocess.load_nifti_dhw`).
* DICOM: HU = RescaleSlope * stored + RescaleIntercept of each slice; slices
  ordered by their position along the slice normal (ImagePositionPatient
  projected on the cross product of the ImageOrientationPatient row and column
  directions), never by file name; the z spacing is the median distance between
  neighbouring positions (refused if the distances vary by more than 10 %, e.g.
  a missing slice); the in-plane spacing is PixelSpacing (row, column).  The
  volume is [D, H, W] = [slices by increasing position, Rows, Columns].

A file that cannot be read does not stop the others: its error goes to the
`errors` list when one is passed, else to the log as a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterator

import numpy as np

from data_pipeline import schema
from data_pipeline.preprocess import PreprocessConfig, load_nifti_dhw, preprocess_volume

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Files in a scan folder that are certainly not images; never opened as DICOM.
_NOT_DICOM_SUFFIXES = (".txt", ".csv", ".json", ".md", ".xml", ".html", ".pdf", ".png",
                       ".jpg", ".jpeg", ".zip", ".gz", ".py", ".log")
_MAX_SPACING_DEVIATION = 0.10  # relative; larger gaps mean missing or duplicate slices


class ScanError(ValueError):
    """A user scan that cannot be read or turned into a volume (names its file)."""


@dataclasses.dataclass(frozen=True)
class UserScan:
    """One volume found below the user's path.

    Attributes:
      volume_name: its name relative to the searched path (file or series folder;
        ``folder/<SeriesInstanceUID>`` when a folder holds several series).
      path: the NIfTI file, or the folder of the DICOM series.
      kind: "nifti" or "dicom".
      files: the series' DICOM files (empty for NIfTI).
    """

    volume_name: str
    path: str
    kind: str
    files: tuple[str, ...] = ()


def iter_user_volumes(path: str, config: PreprocessConfig, *,
                      errors: list[tuple[str, str]] | None = None
                      ) -> Iterator[tuple[str, np.ndarray, dict]]:
    """Yields (name, int16[D, H, W] HU at the target grid, info) for every scan at `path`.

    `info` holds ``source_path``, ``kind``, ``original_shape_dhw``,
    ``original_spacing_mm`` (z, y, x) and ``slope_intercept_applied``, and for DICOM
    ``num_slices`` and ``series_instance_uid``.  Scans are yielded in name order.
    A scan that fails is reported as (path, reason) in `errors` (or logged) and
    skipped; a `path` that does not exist or holds no scan at all raises.
    """
    for scan in find_user_scans(path, errors=errors):
        try:
            volume_hu, info = preprocess_user_scan(scan, config)
        except Exception as error:  # noqa: BLE001 - one bad scan must not stop the rest
            _report(errors, scan.path, f"{type(error).__name__}: {error}")
            continue
        yield scan.volume_name, volume_hu, info


def find_user_scans(path: str, *, errors: list[tuple[str, str]] | None = None
                    ) -> list[UserScan]:
    """The NIfTI files and DICOM series at `path` (see the module docstring), by name."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such scan file or folder: {path}")
    if os.path.isfile(path):
        if not path.endswith(NIFTI_SUFFIXES):
            raise ScanError(f"{path} is not a NIfTI file (.nii, .nii.gz); for DICOM pass the "
                            f"series folder")
        return [UserScan(os.path.basename(path), path, "nifti")]

    scans, series = [], {}
    for directory, subdirs, files in os.walk(path):
        subdirs.sort()
        for name in sorted(files):
            file_path = os.path.join(directory, name)
            if name.endswith(NIFTI_SUFFIXES):
                scans.append(UserScan(_relative_name(file_path, path), file_path, "nifti"))
            elif not name.lower().endswith(_NOT_DICOM_SUFFIXES):
                uid = _dicom_series_uid(file_path, errors)
                if uid is not None:
                    series.setdefault((directory, uid), []).append(file_path)
    uids_per_dir: dict[str, int] = {}
    for directory, _ in series:
        uids_per_dir[directory] = uids_per_dir.get(directory, 0) + 1
    for (directory, uid), files in series.items():
        name = _relative_name(directory, path)
        if uids_per_dir[directory] > 1:
            name = f"{name}/{uid}"
        scans.append(UserScan(name, directory, "dicom", tuple(sorted(files))))
    if not scans and not errors:
        raise ScanError(f"no NIfTI files or DICOM series found in {path}")
    return sorted(scans, key=lambda scan: scan.volume_name)


def load_user_scan(scan: UserScan) -> tuple[np.ndarray, tuple[float, float, float], dict]:
    """(float32[D, H, W] HU, (z, y, x) spacing in mm, info) of one scan, not resampled."""
    if scan.kind == "nifti":
        return _load_nifti(scan.path)
    if scan.kind == "dicom":
        return _load_dicom_series(scan)
    raise ValueError(f"unknown scan kind {scan.kind!r}")


def preprocess_user_scan(scan: UserScan, config: PreprocessConfig) -> tuple[np.ndarray, dict]:
    """int16[D, H, W] HU at the target grid and the info dict of one scan."""
    volume_hu, spacing_zyx, info = load_user_scan(scan)
    info.update(original_shape_dhw=list(volume_hu.shape),
                original_spacing_mm=[float(s) for s in spacing_zyx])
    if volume_hu.size and float(volume_hu.min()) > -500:
        # CT air is about -1000 HU; a volume without any is probably not in HU.
        info["warning"] = (f"lowest value {float(volume_hu.min()):.0f}: no air (-1000 HU) in "
                           f"the volume; are the values Hounsfield units?")
    volume_int16 = preprocess_volume(volume_hu, 1.0, 0.0, spacing_zyx, config,
                                     overwrite_input=True)
    return volume_int16, info


def encode_user_scan(scan: UserScan, config: PreprocessConfig) -> bytes:
    """The shard record of one scan: empty texts, unknown labels (-1), info as metadata."""
    volume_hu, info = preprocess_user_scan(scan, config)
    record = schema.CTRecord(volume_hu=volume_hu, volume_name=scan.volume_name,
                             spacing_mm=tuple(float(s) for s in config.target_spacing_mm),
                             metadata=info)
    return schema.encode_record(record)


# ----------------------------------------------------------------------------------
# NIfTI
# ----------------------------------------------------------------------------------


def _load_nifti(path: str):
    import nibabel as nib

    loaded = load_nifti_dhw(path)
    proxy = nib.load(path).dataobj  # nibabel moves scl_slope / scl_inter onto the proxy
    applied = ([float(proxy.slope), float(proxy.inter)] if loaded.header_scaling_applied
               else [1.0, 0.0])
    info = {"source_path": path, "kind": "nifti", "slope_intercept_applied": applied}
    return loaded.volume_dhw, loaded.header_spacing_zyx, info


# ----------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------


def _dicom_series_uid(path: str, errors) -> str | None:
    """SeriesInstanceUID of an image file; None (ignored) for anything else."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        if path.lower().endswith(".dcm"):
            _report(errors, path, "not a readable DICOM file")
        return None  # e.g. a notes file without an extension
    except Exception as error:  # noqa: BLE001 - a truncated or damaged file
        _report(errors, path, f"cannot read DICOM header: {type(error).__name__}: {error}")
        return None
    if "Rows" not in header or "SeriesInstanceUID" not in header:
        return None  # DICOMDIR, structured reports and other non-image objects
    return str(header.SeriesInstanceUID)


def _slice_geometry(header, path: str):
    """(slice normal, position along it, (row, column) spacing) of one DICOM slice."""
    for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        if keyword not in header:
            raise ScanError(f"{path}: no {keyword}; cannot place the slice")
    orientation = np.asarray([float(v) for v in header.ImageOrientationPatient], np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise ScanError(f"{path}: ImageOrientationPatient {list(orientation)} is not two "
                        f"orthonormal directions")
    position = float(np.dot(normal, [float(v) for v in header.ImagePositionPatient]))
    row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)
    return normal, position, (row_spacing, column_spacing)


def _load_dicom_series(scan: UserScan):
    """Reads one series into float32 HU [D, Rows, Columns], slices ordered by position."""
    import pydicom

    slices = []
    for path in scan.files:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        if int(header.get("NumberOfFrames", 1) or 1) > 1:
            raise ScanError(f"{path}: multi-frame (enhanced) DICOM is not supported; "
                            f"convert the series to NIfTI (e.g. dcm2niix) first")
        normal, position, spacing = _slice_geometry(header, path)
        slices.append((position, path, normal, spacing, (int(header.Rows), int(header.Columns))))
    if len(slices) < 2:
        raise ScanError(f"{scan.path}: a series needs at least 2 slices, found {len(slices)}")
    slices.sort(key=lambda s: s[0])
    _, first_path, normal, spacing, shape = slices[0]
    for _, path, other_normal, other_spacing, other_shape in slices[1:]:
        if other_shape != shape or not np.allclose(other_normal, normal, atol=1e-4) \
                or not np.allclose(other_spacing, spacing, rtol=1e-4):
            raise ScanError(f"{scan.path}: {os.path.basename(path)} has another size, "
                            f"orientation or pixel spacing than {os.path.basename(first_path)}")
    positions = np.asarray([s[0] for s in slices])
    gaps = np.diff(positions)
    z_spacing = float(np.median(gaps))
    if z_spacing <= 1e-3 or np.max(np.abs(gaps - z_spacing)) > _MAX_SPACING_DEVIATION * z_spacing:
        raise ScanError(f"{scan.path}: slice positions are not evenly spaced (gaps from "
                        f"{gaps.min():.3f} to {gaps.max():.3f} mm): missing or duplicate slices?")

    volume = np.empty((len(slices), *shape), np.float32)
    scalings = set()
    for index, (_, path, *_rest) in enumerate(slices):
        dataset = pydicom.dcmread(path)
        slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
        np.copyto(volume[index], dataset.pixel_array, casting="unsafe")
        if slope != 1.0:
            volume[index] *= np.float32(slope)
        if intercept != 0.0:
            volume[index] += np.float32(intercept)
        scalings.add((slope, intercept))
    applied = [list(s) for s in sorted(scalings)]
    info = {"source_path": scan.path, "kind": "dicom", "num_slices": len(slices),
            "series_instance_uid": str(pydicom.dcmread(first_path, stop_before_pixels=True)
                                       .SeriesInstanceUID),
            "slope_intercept_applied": applied[0] if len(applied) == 1 else applied}
    return volume, (z_spacing, *spacing), info


def _relative_name(path: str, root: str) -> str:
    relative = os.path.relpath(path, root)
    return os.path.basename(root) if relative == "." else relative.replace(os.sep, "/")


def _report(errors: list | None, path: str, reason: str) -> None:
    if errors is None:
        logging.warning("skipping %s: %s", path, reason)
    else:
        errors.append((path, reason))
