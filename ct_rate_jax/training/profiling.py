"""A `jax.profiler` trace of chosen training steps (`--profile_steps START:END`).

The trace (an XSpace `*.xplane.pb` for TensorBoard's profile plugin / XProf, and a
`*.trace.json.gz` that Perfetto opens) goes to `<workdir>/profile/plugins/profile/<run>/`.
Steps are the loop's 0-based step indices with Python slice semantics: `10:13` traces
the three steps that take the state from step 10 to step 13.  Skip the first steps
(compilation) and keep the window short: traces grow quickly.  With several processes
only process 0 traces (every process runs the same SPMD program).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax


def parse_profile_steps(spec: str | None) -> tuple[int, int] | None:
    """"START:END" -> (START, END) with 0 <= START < END; None or "" -> None."""
    if not spec:
        return None
    parts = spec.split(":")
    try:
        start, end = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        start = end = None
    if start is None or start < 0 or end <= start:
        raise ValueError(f"train.profile_steps / --profile_steps must be START:END with "
                         f"0 <= START < END (e.g. 10:13), got {spec!r}")
    return start, end


class StepProfiler:
    """Starts a trace before step START is dispatched and stops it once step END - 1
    has finished on the device.

        profiler = StepProfiler((10, 13), logdir)
        for step in ...:
            profiler.before_step(step)
            with profiler.annotate(step):
                state = train_step(state, batch)
            profiler.after_step(step, state)
        profiler.close()
    """

    def __init__(self, steps: tuple[int, int] | None, logdir: str, *, enabled: bool = True):
        self.steps = steps if enabled else None
        self.logdir = logdir
        self.active = False
        self.done = False

    def before_step(self, step: int) -> None:
        if self.steps is None or self.active or self.done:
            return
        start, end = self.steps
        if start <= step < end:
            os.makedirs(self.logdir, exist_ok=True)
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def annotate(self, step: int):
        """Marks a step in the trace (TensorBoard's per-step view) while tracing."""
        if not self.active:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after_step(self, step: int, outputs: Any) -> None:
        """Stops after step END - 1, once its outputs exist (the device work is traced)."""
        if self.active and step + 1 >= self.steps[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active, self.done = False, True
