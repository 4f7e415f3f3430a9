"""The CT-RATE release layout and the record schema of our shards.

This is the one module that the data side and the model side share (see
docs/data.md).  It imports nothing heavier than numpy so that preparation
workers, the Grain pipeline and the evaluation code can all use it.

Release layout (as published on Hugging Face, `ibrahimhamamci/CT-RATE`)::

    dataset/train/train_12/train_12_a/train_12_a_1.nii.gz
            ^split ^patient  ^scan      ^reconstruction
    dataset/metadata/{train,validation}_metadata.csv
    dataset/radiology_text_reports/{train,validation}_reports.csv
    dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv

Record encoding (``RECORD_FORMAT_VERSION`` 1), one ArrayRecord entry per volume::

    b"CTR1" | uint32 little-endian header length N | N bytes of UTF-8 JSON header
            | int16 little-endian voxels, C order, shape header["shape"] (D, H, W)

The header holds every non-volume field (``VolumeName``, ids, texts, labels,
spacing, the metadata row).  The voxels are Hounsfield units at the target
grid, already clipped to the HU window; normalisation to [-1, 1] is
`normalise_hu` below, the one function for training and inference: on the host
in the input pipeline, or on the accelerator inside a jitted step
(`model_volume`, for batches that carry int16 ``volume_hu``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Any

import numpy as np

RECORD_FORMAT_VERSION = 1
_MAGIC = b"CTR1"
DEFAULT_HU_WINDOW = (-1000.0, 1000.0)

# The 18 abnormality columns of `multi_abnormality_labels/*_predicted_labels.csv`,
# in the release's column order (also the order of the official zero-shot script).
ABNORMALITIES: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)
NUM_ABNORMALITIES = len(ABNORMALITIES)

REPORT_COLUMNS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN",
                  "Impressions_EN")

# Columns of `metadata/*_metadata.csv` in the real release.  Preparation needs only
# VolumeName, RescaleSlope, RescaleIntercept, XYSpacing and ZSpacing; the rest is
# carried into each record's metadata row.
METADATA_COLUMNS = (
    "VolumeName", "Manufacturer", "SeriesDescription", "ManufacturerModelName", "PatientSex",
    "PatientAge", "ReconstructionDiameter", "DistanceSourceToDetector",
    "DistanceSourceToPatient", "GantryDetectorTilt", "TableHeight", "RotationDirection",
    "XRayTubeCurrent", "Exposure", "FilterType", "GeneratorPower", "FocalSpots",
    "ConvolutionKernel", "PatientPosition", "RevolutionTime", "SingleCollimationWidth",
    "TotalCollimationWidth", "TableSpeed", "TableFeedPerRotation", "SpiralPitchFactor",
    "DataCollectionCenterPatient", "ReconstructionTargetCenterPatient",
    "ExposureModulationType", "CTDIvol", "ImagePositionPatient", "ImageOrientationPatient",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "RescaleIntercept",
    "RescaleSlope", "RescaleType", "NumberofSlices", "ZSpacing", "Rows", "Columns",
    "XYSpacing", "StudyDate",
)

# The CSV file names differ between splits in the release ("validation" vs "valid").
SPLIT_FILES = {
    "train": {"volumes": "train", "metadata": "train_metadata.csv",
              "reports": "train_reports.csv", "labels": "train_predicted_labels.csv"},
    "valid": {"volumes": "valid", "metadata": "validation_metadata.csv",
              "reports": "validation_reports.csv", "labels": "valid_predicted_labels.csv"},
}

_VOLUME_NAME = re.compile(r"^(train|valid)_(\d+)_([a-z]+)_(\d+)\.nii(\.gz)?$")


@dataclasses.dataclass(frozen=True)
class VolumeId:
    """The parts of a CT-RATE VolumeName such as ``train_12_a_1.nii.gz``."""

    split: str  # "train" or "valid"
    patient: int
    scan: str  # "a", "b", ...: one study (accession) of the patient
    reconstruction: int

    @property
    def patient_id(self) -> str:
        return f"{self.split}_{self.patient}"

    @property
    def scan_id(self) -> str:
        return f"{self.patient_id}_{self.scan}"

    @property
    def volume_name(self) -> str:
        return f"{self.scan_id}_{self.reconstruction}.nii.gz"

    def relative_path(self, volumes_dir: str | None = None) -> str:
        """Path below `dataset/`, e.g. ``train/train_12/train_12_a/train_12_a_1.nii.gz``."""
        top = volumes_dir or self.split
        return os.path.join(top, self.patient_id, self.scan_id, self.volume_name)


def parse_volume_name(name: str) -> VolumeId:
    """Parses ``train_12_a_1.nii.gz`` into its parts; raises ValueError naming `name`."""
    match = _VOLUME_NAME.match(os.path.basename(name))
    if not match:
        raise ValueError(
            f"{name!r} is not a CT-RATE VolumeName (expected e.g. 'train_12_a_1.nii.gz')")
    split, patient, scan, recon, _ = match.groups()
    return VolumeId(split, int(patient), scan, int(recon))


def format_xy_spacing(spacing_mm: float) -> str:
    """The release writes XYSpacing as a list string, e.g. ``[0.75, 0.75]``."""
    return f"[{spacing_mm!r}, {spacing_mm!r}]"


def parse_xy_spacing(text: str) -> tuple[float, float]:
    """Parses the release's XYSpacing string (``"[0.75, 0.75]"``) into (row, column) mm."""
    values = [float(v) for v in str(text).strip().strip("[]()").split(",") if v.strip()]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise ValueError(f"XYSpacing {text!r} is not of the form '[0.75, 0.75]'")
    return values[0], values[1]


# ----------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------


@dataclasses.dataclass
class CTRecord:
    """One prepared volume with its text, labels and provenance.

    Attributes:
      volume_hu: int16[D, H, W] Hounsfield units at the target grid (depth first,
        the official model's layout).
      volume_name: the release's VolumeName.
      findings, impressions: report sections (empty string when absent).
      labels: int8[18] in `ABNORMALITIES` order (-1 where unknown).
      spacing_mm: (z, y, x) spacing of `volume_hu` in mm.
      metadata: the metadata CSV row as strings, plus anything preparation adds.
    """

    volume_hu: np.ndarray
    volume_name: str
    findings: str = ""
    impressions: str = ""
    labels: np.ndarray = dataclasses.field(
        default_factory=lambda: np.full(NUM_ABNORMALITIES, -1, np.int8))
    spacing_mm: tuple[float, float, float] = (1.5, 0.75, 0.75)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ids(self) -> VolumeId | None:
        try:
            return parse_volume_name(self.volume_name)
        except ValueError:
            return None  # a user's own scan, not named the CT-RATE way


def encode_record(record: CTRecord) -> bytes:
    """Serialises a record into the versioned byte format described above."""
    volume = np.ascontiguousarray(record.volume_hu, dtype="<i2")
    ids = record.ids
    header = {
        "version": RECORD_FORMAT_VERSION,
        "shape": list(volume.shape),
        "VolumeName": record.volume_name,
        "patient_id": ids.patient_id if ids else None,
        "scan_id": ids.scan_id if ids else None,
        "reconstruction": ids.reconstruction if ids else None,
        "findings": record.findings,
        "impressions": record.impressions,
        "labels": [int(v) for v in np.asarray(record.labels).reshape(-1)],
        "spacing_mm": [float(s) for s in record.spacing_mm],
        "metadata": record.metadata,
    }
    header_bytes = json.dumps(header, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return _MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes + volume.tobytes()


def decode_header(data: bytes) -> tuple[dict[str, Any], int]:
    """Returns (header, offset of the voxel bytes); raises ValueError on a bad record."""
    if len(data) < 8 or data[:4] != _MAGIC:
        raise ValueError("not a ct-rate-jax record (bad magic bytes)")
    (header_len,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + header_len].decode("utf-8"))
    if header.get("version") != RECORD_FORMAT_VERSION:
        raise ValueError(f"record format version {header.get('version')} is not supported "
                         f"(this code reads version {RECORD_FORMAT_VERSION})")
    return header, 8 + header_len


def decode_record(data: bytes) -> CTRecord:
    """Inverse of `encode_record`; the volume is a read-only view when possible."""
    header, offset = decode_header(data)
    shape = tuple(header["shape"])
    expected = int(np.prod(shape)) * 2
    if len(data) - offset != expected:
        raise ValueError(f"record for {header.get('VolumeName')!r} holds {len(data) - offset} "
                         f"voxel bytes, expected {expected} for shape {shape}")
    volume = np.frombuffer(data, dtype="<i2", offset=offset).reshape(shape)
    return CTRecord(
        volume_hu=volume,
        volume_name=header["VolumeName"],
        findings=header.get("findings", ""),
        impressions=header.get("impressions", ""),
        labels=np.asarray(header["labels"], np.int8),
        spacing_mm=tuple(header["spacing_mm"]),
        metadata=header.get("metadata", {}),
    )


# ----------------------------------------------------------------------------------
# Normalisation (shared by the input pipeline and jitted model steps)
# ----------------------------------------------------------------------------------


def normalise_hu(volume_hu, hu_window: tuple[float, float] = DEFAULT_HU_WINDOW, *,
                 out: np.ndarray | None = None):
    """int16 HU -> float32 in [-1, 1]: clip to the window, centre, divide by half its width.

    With the default window this is the official CT-CLIP normalisation, HU / 1000
    after clipping to [-1000, 1000].  Training, evaluation and inference all use it.

    `volume_hu` is a numpy array (the input pipeline, export, chat) or a jax array,
    also inside `jax.jit` (`model_volume`): the same float32 operations in the same
    order, so both give the same values (bitwise on CPU; the tests check it).
    `out` (numpy float32 of the shape of `volume_hu`, e.g. a row of a batch buffer)
    receives the result instead of a new array; it is returned either way.
    """
    low, high = hu_window
    centre, half_width = (high + low) / 2.0, (high - low) / 2.0
    # Multiplying by the float32 reciprocal (within 1 ulp of dividing): XLA turns a
    # division by a constant into exactly this multiplication, so writing it so here
    # keeps the host and the jitted results bitwise equal.
    scale = np.float32(1.0) / np.float32(half_width)
    if out is None and not isinstance(volume_hu, np.ndarray):
        # A jax array (no jax import here: its methods are numpy's).
        volume = volume_hu.astype(np.float32).clip(np.float32(low), np.float32(high))
        if centre:
            volume = volume - np.float32(centre)
        return volume * scale
    if out is None:
        out = np.empty(volume_hu.shape, np.float32)
    # Convert and clip in one pass into `out`, then centre and scale in place: 2 passes
    # over float32 and no temporary (bitwise the same as astype, clip, subtract, scale).
    np.clip(volume_hu, np.float32(low), np.float32(high), out=out, dtype=np.float32)
    if centre:
        out -= np.float32(centre)
    out *= scale
    return out


def model_volume(batch, hu_window: tuple[float, float] = DEFAULT_HU_WINDOW):
    """float32[B, D, H, W] model input of a batch, in [-1, 1].

    A batch holds either `volume` (normalised on the host) or int16 `volume_hu`
    (the input pipeline's ``normalise_on_device``: half the bytes to move, and no
    host pass), optionally with `intensity_jitter` float32[B, 2] (scale, shift).
    For the latter this is `normalise_hu` and the jitter, meant to run inside the
    jitted step on the accelerator.
    """
    if "volume" in batch:
        return batch["volume"]
    volume = normalise_hu(batch["volume_hu"], hu_window)
    if "intensity_jitter" in batch:
        jitter = batch["intensity_jitter"]
        scale = jitter[:, 0].reshape((-1,) + (1,) * (volume.ndim - 1))
        shift = jitter[:, 1].reshape((-1,) + (1,) * (volume.ndim - 1))
        volume = (volume * scale + shift).clip(np.float32(-1.0), np.float32(1.0))
    return volume
