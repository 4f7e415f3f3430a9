"""Rows of the release's `metadata/*_metadata.csv`: scanner, protocol and geometry.

Scan-level fields (scanner, patient, dose, rescale) are shared by the reconstructions
of a scan; reconstruction-level fields (kernel, spacing, slices, positions) differ.
"""

from __future__ import annotations

import dataclasses
import datetime

import numpy as np

from data_pipeline.schema import METADATA_COLUMNS, format_xy_spacing

# Scanner profiles: (weight, manufacturer, models, soft kernels, sharp kernels,
# source-detector and source-patient distances, filter, rescale intercept, bits stored).
# A minority of volumes stores HU + 8192, as some CT-RATE series do.
_PROFILES = (
    (0.45, "SIEMENS", ("SOMATOM go.Now", "SOMATOM Definition Edge"), ("Br40d", "B31f"),
     ("Bl57d", "B70f"), 1085.6, 595.0, "FLAT", -1024.0, 12),
    (0.40, "PHILIPS", ("Ingenuity Core", "Brilliance 64"), ("B", "C"), ("YA", "L"),
     1040.0, 570.0, "B", -1024.0, 12),
    (0.15, "GE MEDICAL SYSTEMS", ("Revolution EVO", "Optima CT660"), ("STANDARD", "SOFT"),
     ("LUNG", "BONE"), 946.7, 541.0, "BODY FILTER", -8192.0, 16),
)
_FIRST_STUDY = datetime.date(2018, 1, 1)
# Nominal slice thickness of a scan's protocol as named in SeriesDescription and the
# report's technique section (the synthetic ZSpacing itself is downscaled).
NOMINAL_SLICE_THICKNESS_MM = ("1", "1.25", "1.5", "2", "3")


@dataclasses.dataclass(frozen=True)
class ScanProtocol:
    """What the reconstructions of one scan share."""

    fields: dict[str, str]  # scan-level metadata columns
    soft_kernel: str
    sharp_kernel: str
    rescale_intercept: float
    rescale_slope: float
    study_date: datetime.date


def _number(value: float, digits: int = 3) -> str:
    return repr(round(float(value), digits))


def _vector(values, digits: int = 3) -> str:
    return "[" + ", ".join(_number(v, digits) for v in values) + "]"


def draw_protocol(rng: np.random.Generator, sex: str, age: float,
                  study_date: datetime.date) -> ScanProtocol:
    """Scanner, patient and acquisition fields of one scan."""
    weights = np.array([profile[0] for profile in _PROFILES])
    (_, maker, models, soft, sharp, source_detector, source_patient, filter_type, intercept,
     bits) = _PROFILES[int(rng.choice(len(_PROFILES), p=weights / weights.sum()))]
    current = int(rng.integers(60, 320))
    rotation = float(rng.choice([0.35, 0.5, 0.6]))
    pitch = round(float(rng.uniform(0.8, 1.4)), 3)
    collimation = 0.6 if maker == "SIEMENS" else 0.625
    total_collimation = collimation * int(rng.choice([32, 64]))
    feed = pitch * total_collimation
    fields = {
        "Manufacturer": maker,
        "ManufacturerModelName": models[int(rng.integers(len(models)))],
        "PatientSex": sex,
        "PatientAge": f"{int(age):03d}Y",
        "DistanceSourceToDetector": _number(source_detector),
        "DistanceSourceToPatient": _number(source_patient),
        "GantryDetectorTilt": "0.0",
        "TableHeight": _number(rng.uniform(140, 190), 1),
        "RotationDirection": "CW",
        "XRayTubeCurrent": str(current),
        "Exposure": str(int(current * rotation)),
        "FilterType": filter_type,
        "GeneratorPower": str(int(current * 120 / 1000) * 1000),
        "FocalSpots": _vector([0.7, 0.7]) if maker == "SIEMENS" else _number(1.2),
        "PatientPosition": "HFS",
        "RevolutionTime": _number(rotation),
        "SingleCollimationWidth": _number(collimation),
        "TotalCollimationWidth": _number(total_collimation),
        "TableSpeed": _number(feed / rotation),
        "TableFeedPerRotation": _number(feed),
        "SpiralPitchFactor": _number(pitch),
        "ExposureModulationType": "XYZ_EC" if maker == "SIEMENS" else "DOM",
        "CTDIvol": _number(rng.uniform(2.0, 12.0), 2),
        "ImageOrientationPatient": "[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]",
        "BitsAllocated": "16",
        "BitsStored": str(bits),
        "HighBit": str(bits - 1),
        "PixelRepresentation": "1" if intercept < -1024 else "0",
        "RescaleIntercept": _number(intercept),
        "RescaleSlope": "1.0",
        "RescaleType": "HU",
        "StudyDate": study_date.strftime("%Y%m%d"),
    }
    return ScanProtocol(fields, soft[int(rng.integers(len(soft)))],
                        sharp[int(rng.integers(len(sharp)))], intercept, 1.0, study_date)


def draw_study_date(rng: np.random.Generator, previous: datetime.date | None) -> datetime.date:
    """A study date in 2018-2021, or 1-24 months after the patient's previous scan."""
    if previous is None:
        return _FIRST_STUDY + datetime.timedelta(days=int(rng.integers(0, 4 * 365)))
    return previous + datetime.timedelta(days=int(rng.integers(30, 730)))


def metadata_row(volume_name: str, protocol: ScanProtocol, kernel: str, shape, xy_mm: float,
                 z_mm: float, slice_thickness: str, table_z_mm: float) -> dict[str, str]:
    """One row of the metadata CSV (all METADATA_COLUMNS) for a reconstruction.

    `shape` is the (rows, columns, slices) of the volume; `table_z_mm` the DICOM z of
    its first slice.
    """
    rows, columns, slices = shape
    diameter = xy_mm * columns
    first_voxel = (-0.5 * (columns - 1) * xy_mm, -0.5 * (rows - 1) * xy_mm, table_z_mm)
    centre = (0.0, 0.0, table_z_mm + 0.5 * (slices - 1) * z_mm)
    row = dict(protocol.fields)
    row.update({
        "VolumeName": volume_name,
        "SeriesDescription": f"THORAX {slice_thickness} {kernel}",
        "ReconstructionDiameter": _number(diameter),
        "ConvolutionKernel": kernel,
        "DataCollectionCenterPatient": _vector(centre),
        "ReconstructionTargetCenterPatient": _vector(centre),
        "ImagePositionPatient": _vector(first_voxel),
        "NumberofSlices": str(slices),
        "ZSpacing": repr(float(z_mm)),
        "Rows": str(rows),
        "Columns": str(columns),
        "XYSpacing": format_xy_spacing(float(xy_mm)),
    })
    return {column: row[column] for column in METADATA_COLUMNS}
