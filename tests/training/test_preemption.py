"""StopRequest: signals become a stop flag inside the block, and only there."""

import os
import signal

import pytest

from ct_rate_jax.training.preemption import StopRequest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_sets_the_flag_and_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    with StopRequest() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), sig)
        assert stop.requested() and stop.signal_name == signal.Signals(sig).name
    assert signal.getsignal(sig) == before


def test_second_sigint_does_what_sigint_did_before():
    # Earlier tests (or libraries) may have replaced Python's SIGINT handler; start from
    # the interpreter's default so that "what it did before" is a KeyboardInterrupt.
    earlier = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested()
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, earlier)
