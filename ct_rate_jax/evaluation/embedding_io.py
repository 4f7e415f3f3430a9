"""Embedding files keyed by VolumeName: .npz and Parquet, with their provenance.

Arrays (N rows, in data order):
  volume_names   str[N]
  image_latents  float32[N, L]
  text_latents   float32[N, L]              (optional: latents of the reports)
  tokens         float32[N, T, h, w, d]     (optional: CT-ViT token grid before pooling)
and `metadata`, a JSON-able dict (model, checkpoint, data, preprocessing identity).

.npz stores each array as is and the metadata as a JSON string under "metadata".
Parquet stores one row per volume: VolumeName, then each array as a fixed-size list of
float32 (token grids flattened, their shape in the metadata); the metadata is the
schema's "ct_rate_jax" entry.  Both round trips are bitwise.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

ARRAYS = ("image_latents", "text_latents", "tokens")
METADATA_KEY = "ct_rate_jax"


def save_npz(path: str, volume_names, arrays: dict[str, np.ndarray],
             metadata: dict[str, Any]) -> None:
    np.savez(path, volume_names=np.asarray(volume_names, dtype=str),
             metadata=np.asarray(json.dumps(metadata)),
             **{k: np.asarray(v) for k, v in arrays.items() if v is not None})


def load_npz(path: str) -> tuple[list[str], dict[str, np.ndarray], dict[str, Any]]:
    """(volume names, {array name: array}, metadata)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in ARRAYS if k in data}
        return list(data["volume_names"]), arrays, json.loads(str(data["metadata"]))


def save_parquet(path: str, volume_names, arrays: dict[str, np.ndarray],
                 metadata: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"VolumeName": pa.array(list(volume_names), pa.string())}
    shapes = {}
    for name, array in arrays.items():
        if array is None:
            continue
        array = np.ascontiguousarray(array, np.float32)
        shapes[name] = list(array.shape[1:])
        width = int(np.prod(array.shape[1:]))
        columns[name] = pa.FixedSizeListArray.from_arrays(
            pa.array(array.reshape(-1)), width)
    meta = dict(metadata, array_shapes=shapes)
    table = pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(meta)})
    pq.write_table(table, path)


def load_parquet(path: str) -> tuple[list[str], dict[str, np.ndarray], dict[str, Any]]:
    """(volume names, {array name: array}, metadata), arrays in their stored shapes."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[METADATA_KEY.encode()])
    shapes = meta.pop("array_shapes")
    arrays = {}
    for name, shape in shapes.items():
        column = table.column(name).combine_chunks()
        flat = column.values.to_numpy(zero_copy_only=False)
        arrays[name] = flat.reshape(len(table), *shape)
    return table.column("VolumeName").to_pylist(), arrays, meta
