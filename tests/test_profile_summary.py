"""benchmarks/profile_summary: device time per op, named by JAX op and source line."""

import jax
import jax.numpy as jnp

from benchmarks import profile_summary


def _step(x):
    y = jnp.tanh(x @ x)  # the matmul: the op that takes the time
    return y.sum()


def test_trace_names_ops_by_source_line(tmp_path):
    x = jnp.ones((384, 384))
    compiled = jax.jit(_step).lower(x).compile()
    compiled(x).block_until_ready()

    def run(steps):
        for _ in range(steps):
            compiled(x).block_until_ready()

    ops = profile_summary.trace_ops(run, compiled.as_text(), str(tmp_path), steps=2)
    assert ops and abs(sum(op.share for op in ops) - 1.0) < 1e-6
    assert all(op.seconds_per_step > 0 for op in ops[:1])
    # Every op the step ran is attributed to this file's lines (the fusion roots).
    sources = {op.op_name.partition(" @ ")[2] for op in ops}
    assert sources & {"test_profile_summary.py:10", "test_profile_summary.py:11"}, sources

    grouped = profile_summary.by_source(ops)
    assert abs(sum(g.seconds_per_step for g in grouped)
               - sum(o.seconds_per_step for o in ops)) < 1e-9
    table = profile_summary.format_table(grouped, top=5)
    assert table.startswith("| ms/step | share | HLO op | JAX op |")
    assert "summed op time" in table.splitlines()[-1]
