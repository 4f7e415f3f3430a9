"""Evaluation on several processes: each embeds its share of the volumes, then all
shares are gathered in data order.

The share is `iterate_eval_batches`'s: step s of the global batch (batch size x
process count rows) gives process p the rows [s*G + p*b, s*G + (p+1)*b).
`process_rows` lists them, `merge_parts` puts shares back in record order (plain
numpy, so the split can be tested in one process), and `allgather_embedded` does the
exchange between processes (`jax.experimental.multihost_utils.process_allgather`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ct_rate_jax.evaluation.runner import EmbeddedSet

NAME_BYTES = 512  # longest VolumeName (UTF-8) that the exchange carries


def process_rows(num_records: int, batch_size: int, process_index: int,
                 process_count: int) -> np.ndarray:
    """int64[n] record indices that process `process_index` embeds, in its order."""
    if not 0 <= process_index < process_count or batch_size < 1:
        raise ValueError(f"process {process_index} of {process_count}, batch {batch_size}")
    step = batch_size * process_count
    rows = [np.arange(start, min(start + batch_size, num_records))
            for start in range(process_index * batch_size, num_records, step)]
    return np.concatenate(rows) if rows else np.zeros(0, np.int64)


def merge_parts(parts: Sequence[tuple[EmbeddedSet, np.ndarray]]) -> EmbeddedSet:
    """One EmbeddedSet in record order from (share, its record indices) pairs."""
    indices = np.concatenate([np.asarray(i, np.int64) for _, i in parts])
    if len(np.unique(indices)) != len(indices):
        raise ValueError("the shares overlap")
    order = np.argsort(indices, kind="stable")
    names = [n for part, _ in parts for n in part.volume_names]

    def stack(field):
        arrays = [getattr(part, field) for part, _ in parts if len(part)]
        if not arrays or arrays[0] is None:
            return None
        return np.concatenate(arrays)[order]

    return EmbeddedSet([names[i] for i in order], stack("labels"), stack("image_latents"),
                       stack("text_latents"), stack("tokens"))


def _encode_names(names: Sequence[str], rows: int) -> np.ndarray:
    out = np.zeros((rows, NAME_BYTES), np.uint8)
    for i, name in enumerate(names):
        data = name.encode("utf-8")
        if len(data) > NAME_BYTES:
            raise ValueError(f"volume name longer than {NAME_BYTES} bytes: {name[:80]}...")
        out[i, :len(data)] = np.frombuffer(data, np.uint8)
    return out


def _decode_names(array: np.ndarray) -> list[str]:
    return [bytes(row).rstrip(b"\0").decode("utf-8") for row in array]


def allgather_embedded(part: EmbeddedSet, indices: np.ndarray, num_records: int,
                       batch_size: int, *, force: bool = False) -> EmbeddedSet:
    """Every process's share, in record order, on every process.

    Shares are padded to the largest share (`process_rows`) so that all processes send
    arrays of one shape.  With one process it returns `part` reordered, unless `force`
    (tests: the exchange itself with a single process).
    """
    import jax
    from jax.experimental import multihost_utils

    count = jax.process_count()
    if count == 1 and not force:
        return merge_parts([(part, indices)])
    rows = max(len(process_rows(num_records, batch_size, p, count)) for p in range(count))

    def pad(array):
        array = np.asarray(array)
        return np.concatenate([array, np.zeros((rows - len(array), *array.shape[1:]),
                                                array.dtype)])

    packed = {"indices": pad(np.asarray(indices, np.int64)),
              "count": np.asarray(len(part), np.int64),
              "names": _encode_names(part.volume_names, rows),
              "labels": pad(part.labels), "image_latents": pad(part.image_latents)}
    for optional in ("text_latents", "tokens"):
        if getattr(part, optional) is not None:
            packed[optional] = pad(getattr(part, optional))
    gathered = multihost_utils.process_allgather(packed)  # every leaf gains [count, ...]
    parts = []
    for p in range(count):
        n = int(gathered["count"][p])
        parts.append((EmbeddedSet(
            _decode_names(gathered["names"][p][:n]), gathered["labels"][p][:n],
            gathered["image_latents"][p][:n],
            gathered["text_latents"][p][:n] if "text_latents" in gathered else None,
            gathered["tokens"][p][:n] if "tokens" in gathered else None),
            gathered["indices"][p][:n]))
    return merge_parts(parts)
