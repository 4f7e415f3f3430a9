"""Stopping a training run cleanly when the machine is being taken away.

Preemptible TPU VMs and cloud GPUs get SIGTERM some seconds before they go; a user
stops a run with Ctrl-C (SIGINT).  Either way the right thing is to finish the step
that is running, write a checkpoint, wait until it is on disk and exit 0, so that
rerunning the same command resumes.  `StopRequest` turns the signals into a flag that
the training loop polls between steps; a second signal of the same kind falls back to
the default behaviour (an impatient second Ctrl-C still kills the process).
"""

from __future__ import annotations

import signal
from types import FrameType

import jax
import numpy as np
from jax.experimental import multihost_utils

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A context manager that records SIGTERM / SIGINT instead of dying on them.

        with StopRequest() as stop:
            for step in ...:
                ...
                if stop.requested():
                    save; break
    """

    def __init__(self, signals=HANDLED_SIGNALS):
        self._signals = tuple(signals)
        self._previous: dict[int, object] = {}
        self.received: int | None = None

    def __enter__(self) -> StopRequest:
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.received == signum:  # the second time: do what the signal normally does
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def requested(self) -> bool:
        """Whether any process was asked to stop.  With several processes every one
        must stop after the same step (they all take part in the checkpoint), so the
        flag is combined over processes, one tiny all-gather per call."""
        local = self.received is not None
        if jax.process_count() == 1:
            return local
        flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
        return bool(np.asarray(flags).any())
