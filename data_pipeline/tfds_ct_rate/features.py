"""The ``ct_rate`` TFDS example: one prepared volume as a TFDS `FeaturesDict`.

The fields are those of `schema.CTRecord` (the record of our own shards), so a
TFDS example and a shard record carry the same content:

| feature | TFDS type | record field |
|---|---|---|
| ``volume`` | Tensor int16[D, H, W], raw bytes | `volume_hu` (HU, clipped, at the target grid) |
| ``volume_name`` | Text | `volume_name` |
| ``patient_id``, ``scan_id`` | Text | from the VolumeName |
| ``reconstruction`` | int32 | from the VolumeName |
| ``findings``, ``impressions`` | Text | report sections |
| ``labels`` | Tensor int8[18] | `labels` (`schema.ABNORMALITIES` order, -1 unknown) |
| ``spacing_mm`` | Tensor float32[3] | `spacing_mm` (z, y, x) |
| ``metadata`` | Text (JSON object) | `metadata` (the CSV row plus preparation's keys) |

The volume is stored as raw little-endian int16 bytes (``Encoding.BYTES``):
TFDS's default encoding would widen int16 to int64 in the serialized example,
four times the bytes.  The metadata row has free-form keys, so it travels as
one JSON text rather than a nested feature dict with a fixed key set.

Nothing here imports TensorFlow: TFDS's ArrayRecord writing and reading work
without it (see docs/data.md, "TFDS builder").
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import schema


def ct_rate_features(target_shape: Sequence[int]) -> tfds.features.FeaturesDict:
    """The FeaturesDict of one example; `target_shape` is the (D, H, W) of every volume."""
    text = tfds.features.Text
    return tfds.features.FeaturesDict({
        "volume": tfds.features.Tensor(
            shape=tuple(int(s) for s in target_shape), dtype=np.int16,
            encoding=tfds.features.Encoding.BYTES,
            doc="int16[D, H, W] Hounsfield units at the target grid, clipped to the HU window"),
        "volume_name": text(doc="the release's VolumeName, e.g. train_12_a_1.nii.gz"),
        "patient_id": text(doc="e.g. train_12"),
        "scan_id": text(doc="e.g. train_12_a"),
        "reconstruction": tfds.features.Scalar(dtype=np.int32, doc="e.g. 1"),
        "findings": text(doc="Findings_EN of the report"),
        "impressions": text(doc="Impressions_EN of the report"),
        "labels": tfds.features.Tensor(
            shape=(schema.NUM_ABNORMALITIES,), dtype=np.int8,
            doc="the 18 abnormalities in schema.ABNORMALITIES order; -1 where unknown"),
        "spacing_mm": tfds.features.Tensor(shape=(3,), dtype=np.float32,
                                           doc="(z, y, x) spacing of `volume` in mm"),
        "metadata": text(doc="JSON object: the metadata CSV row and preparation's additions"),
    })


def record_to_example(record: schema.CTRecord) -> dict[str, Any]:
    """A decoded shard record as a TFDS example dict (for `FeaturesDict.encode_example`)."""
    ids = record.ids
    return {
        "volume": np.ascontiguousarray(record.volume_hu, dtype=np.int16),
        "volume_name": record.volume_name,
        "patient_id": ids.patient_id if ids else "",
        "scan_id": ids.scan_id if ids else "",
        "reconstruction": np.int32(ids.reconstruction if ids else -1),
        "findings": record.findings,
        "impressions": record.impressions,
        "labels": np.asarray(record.labels, np.int8),
        "spacing_mm": np.asarray(record.spacing_mm, np.float32),
        "metadata": json.dumps(record.metadata, ensure_ascii=False, sort_keys=True),
    }


def example_to_record(example: dict[str, Any]) -> schema.CTRecord:
    """An example read back from `tfds.data_source` as the project's `CTRecord`.

    TFDS returns Text features as UTF-8 bytes; they are decoded here.
    """
    def text(value) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    return schema.CTRecord(
        volume_hu=np.asarray(example["volume"], np.int16),
        volume_name=text(example["volume_name"]),
        findings=text(example["findings"]),
        impressions=text(example["impressions"]),
        labels=np.asarray(example["labels"], np.int8),
        spacing_mm=tuple(float(s) for s in example["spacing_mm"]),
        metadata=json.loads(text(example["metadata"])),
    )
