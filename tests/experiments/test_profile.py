"""`--profile_steps START:END`: a jax.profiler trace of exactly those steps.

The end-to-end flag is exercised by tests/experiments/test_multihost.py (its 2-process
run traces a step into <workdir>/profile).
"""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from ct_rate_jax.training import profiling


def test_profile_steps_are_parsed_or_refused_with_the_setting_named():
    assert profiling.parse_profile_steps(None) is None
    assert profiling.parse_profile_steps("10:13") == (10, 13)
    for bad in ("10", "5:5", "7:3", "-1:2", "a:b", "1:2:3"):
        with pytest.raises(ValueError, match="profile_steps"):
            profiling.parse_profile_steps(bad)


def test_trace_of_the_chosen_steps_is_written(tmp_path):
    step_fn = jax.jit(lambda x: jnp.tanh(x @ x.T) * 0.5)
    x = jnp.ones((64, 64))
    profiler = profiling.StepProfiler((2, 4), str(tmp_path / "profile"))
    tracing = []
    for step in range(6):
        profiler.before_step(step)
        with profiler.annotate(step):
            x = step_fn(x)
        tracing.append(profiler.active)
        profiler.after_step(step, x)
    profiler.close()
    assert tracing == [False, False, True, True, False, False]
    runs = list((tmp_path / "profile" / "plugins" / "profile").iterdir())
    assert len(runs) == 1
    assert list(runs[0].glob("*.xplane.pb"))
    (trace_file,) = runs[0].glob("*.trace.json.gz")
    events = json.loads(gzip.decompress(trace_file.read_bytes()))["traceEvents"]
    names = {e.get("name", "") for e in events}
    # Steps 2 and 3 are annotated, the others were not traced.
    assert any("train" in n for n in names)
    steps = {str(e.get("args", {}).get("step_num")) for e in events if e.get("name") == "train"}
    assert steps == {"2", "3"}


def test_disabled_profiler_writes_nothing(tmp_path):
    profiler = profiling.StepProfiler((0, 2), str(tmp_path / "profile"), enabled=False)
    profiler.before_step(0)
    profiler.after_step(1, jnp.ones(2))
    profiler.close()
    assert not (tmp_path / "profile").exists()
