"""Evaluation on several processes: the shares, their merge and the exchange."""

import numpy as np
import pytest

from ct_rate_jax.evaluation import distributed
from ct_rate_jax.evaluation.runner import EmbeddedSet


@pytest.mark.parametrize("num_records,batch,count", [(30, 8, 2), (5, 4, 3), (17, 1, 4)])
def test_process_rows_partition_the_records(num_records, batch, count):
    shares = [distributed.process_rows(num_records, batch, p, count) for p in range(count)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(num_records))


def _part(indices, dim=4, tokens=False):
    indices = np.asarray(indices)
    return EmbeddedSet([f"volume_{i}" for i in indices],
                       (indices[:, None] % 2 * np.ones((1, 3))).astype(np.float32),
                       indices[:, None] + np.zeros((1, dim), np.float32),
                       -indices[:, None] + np.zeros((1, dim), np.float32),
                       indices[:, None, None] + np.zeros((1, 2, 2), np.float32) if tokens
                       else None)


def test_merge_and_single_process_exchange_restore_record_order():
    shares = [distributed.process_rows(11, 2, p, 3) for p in range(3)]
    merged = distributed.merge_parts([(_part(s), s) for s in shares])
    np.testing.assert_array_equal(merged.image_latents[:, 0], np.arange(11))
    assert merged.volume_names == [f"volume_{i}" for i in range(11)]
    np.testing.assert_array_equal(merged.text_latents[:, 0], -np.arange(11))
    # The exchange itself (process_allgather), run with this single process.
    rows = distributed.process_rows(5, 2, 0, 1)[::-1].copy()  # out of order on purpose
    gathered = distributed.allgather_embedded(_part(rows, tokens=True), rows, 5, 2, force=True)
    np.testing.assert_array_equal(gathered.image_latents[:, 0], np.arange(5))
    np.testing.assert_array_equal(gathered.tokens[:, 0, 0], np.arange(5))
    assert gathered.volume_names == [f"volume_{i}" for i in range(5)]
    with pytest.raises(ValueError, match="overlap"):
        distributed.merge_parts([(_part([0, 1]), np.array([0, 1]))] * 2)
