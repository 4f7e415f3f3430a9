"""Fault injection for the kill-and-resume tests (tests/fault/test_prepare_kill.py).

``CT_RATE_JAX_FAILPOINT=<name>:<n>`` makes the process kill itself with SIGKILL the
n-th time it reaches the point `name` (`reached`), so that a test can stop a real
run at an exact moment, e.g. after a shard was renamed but before its completion
was recorded.  Unset (always, outside tests), `reached` does nothing.
"""

from __future__ import annotations

import collections
import os
import signal

ENV_VAR = "CT_RATE_JAX_FAILPOINT"
_times_reached: collections.Counter = collections.Counter()


def reached(name: str) -> None:
    """Marks the point `name`; SIGKILLs this process if the environment asks for it."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _times_reached[name] += 1
    if _times_reached[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
