# A signal while torch's elastic context starts the children reaches rank 0's own handler, never torch's exception.
import signal

import pytest
import torch.distributed.elastic.multiprocessing as elastic_mp
from torch.distributed.elastic.multiprocessing.api import SignalException, _terminate_process_handler

from moreh_ap import launch_context


@pytest.fixture
def handlers():
    """SIGINT and SIGTERM handlers as they were before the test, put back after it."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield before
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _interrupted_start(sig: int, started: list):
    """A ``start_processes`` that installs torch's handlers, as the real one does, and receives ``sig``."""
    def start_processes(**kwargs):
        for each in (signal.SIGINT, signal.SIGTERM):
            signal.signal(each, _terminate_process_handler)
        started.append(kwargs["name"])
        signal.raise_signal(sig)  # torch's handler raises SignalException here
        raise AssertionError("the signal was not delivered")
    return start_processes


def test_ctrl_c_during_the_launch_is_a_keyboard_interrupt_and_the_handlers_come_back(monkeypatch, handlers):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = []
    monkeypatch.setattr(elastic_mp, "start_processes", _interrupted_start(signal.SIGINT, started))
    with pytest.raises(KeyboardInterrupt) as info:
        launch_context.start_children(["python", "x.py"], envs={0: {}}, log_dir=None)
    assert started == ["moreh_ap"]  # the context's handlers were in place when the signal came
    assert not isinstance(info.value, SignalException)
    assert info.value.__context__ is None  # no torch exception in the traceback the user sees
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is handlers[signal.SIGTERM]


def test_a_script_handler_that_lets_the_script_go_on_gets_the_signal_and_the_launch_says_it_is_incomplete(
        monkeypatch, handlers):
    seen = []

    def own(signum, frame):
        seen.append(signum)

    signal.signal(signal.SIGTERM, own)
    monkeypatch.setattr(elastic_mp, "start_processes", _interrupted_start(signal.SIGTERM, []))
    with pytest.raises(RuntimeError, match="SIGTERM arrived while the other ranks were being started"):
        launch_context.start_children(["python", "x.py"], envs={0: {}}, log_dir=None)
    assert seen == [signal.SIGTERM]  # the script's own handler ran, once
    assert signal.getsignal(signal.SIGTERM) is own
