# Ctrl-C and SIGTERM on several ranks: held until the next step boundary, where every rank agrees and raises.
"""How a run of several ranks reacts to Ctrl-C (SIGINT) and SIGTERM, and how a stopped rank ends.

Once a step runs on a world of more than one rank, SIGINT and SIGTERM are held (the handlers are
installed over Python's defaults only; a script's own handlers are left alone): one line says so on
that rank's stderr, and at the start of the next moreh_ap call every rank adds its flag to one small
all-reduce (a 1-element tensor). When any rank got a signal, every rank raises at that same point:
``KeyboardInterrupt`` for Ctrl-C, :class:`Terminated` (a ``KeyboardInterrupt``) for SIGTERM. So the
script's ``except`` / ``finally`` (a ``save(...)``, itself a collective) run on every rank with the same
steps done. A rank blocked in a collective sees the signal when the collective returns, at the latest
after ``MOREH_AP_DIST_TIMEOUT`` (gloo cannot be interrupted). A second signal while one is held raises
at once on that rank, and so does a held signal when no moreh_ap call comes for
``MOREH_AP_DIST_TIMEOUT`` seconds (the script no longer trains).
"""
from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

from moreh_ap import env as _env
from moreh_ap.faults import FaultRecord, check_usable, on_step_failure
from moreh_ap.launch_watch import exit_wait_s

__all__ = ["Terminated", "step_boundary", "pending", "agreed", "after_failure", "wait_to_be_stopped"]

_HELD = (signal.SIGINT, signal.SIGTERM)
_CODE = {signal.SIGINT: 1, signal.SIGTERM: 2}
"""The flag each rank adds to the agreement (the largest wins: SIGTERM over Ctrl-C)."""
_NAME = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class Terminated(KeyboardInterrupt):
    """SIGTERM (e.g. a scheduler's preemption) on some rank, raised on every rank at the same step boundary.

    A subclass of ``KeyboardInterrupt``: ``except KeyboardInterrupt`` catches Ctrl-C and SIGTERM alike,
    ``except moreh_ap.signals.Terminated`` SIGTERM only.
    """


class _State:
    installed = False
    previous: dict = {}
    pending: int | None = None
    """The signal held on this rank, waiting for a step boundary."""
    since = 0.0
    busy = 0
    """moreh_ap calls under way (the late fallback never interrupts one)."""
    agreed: int | None = None
    """The signal every rank raised for at a boundary (the launcher then waits for its children)."""
    timer: threading.Thread | None = None


def pending() -> int | None:
    """The signal held on this rank (waiting for the next step boundary), or None."""
    return _State.pending


def agreed() -> int | None:
    """The signal every rank stopped for at a step boundary, or None."""
    return _State.agreed


def _interrupt(signum: int, text: str) -> KeyboardInterrupt:
    return Terminated(text) if signum == signal.SIGTERM else KeyboardInterrupt(text)


def _say(text: str) -> None:
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except Exception:
        pass


def _handler(signum, frame) -> None:
    if _State.pending is not None:  # a second signal, or the late fallback: at once, on this rank only
        _State.pending = None
        raise _interrupt(signum, f"moreh_ap: {_NAME.get(signum, signum)} again: this rank stops at once, "
                                 "without waiting for the other ranks")
    _State.pending, _State.since = signum, time.monotonic()
    _say(f"moreh_ap: {_NAME.get(signum, signum)} received: every rank stops at the next step "
         "(send it again to stop this rank at once).\n")
    if _State.timer is None or not _State.timer.is_alive():
        _State.timer = threading.Thread(target=_late_fallback, name="moreh_ap-signal", daemon=True)
        _State.timer.start()


def _late_fallback() -> None:
    """A held signal that meets no step boundary (the script stopped training) is raised after the timeout."""
    try:
        bound = _env.read_env().dist_timeout_s
    except ValueError:
        bound = 60.0
    while _State.pending is not None:
        if not _State.busy and time.monotonic() - _State.since > bound:
            _say(f"moreh_ap: no step within {bound:g} s (MOREH_AP_DIST_TIMEOUT) after the signal; "
                 "this rank stops now.\n")
            _thread.interrupt_main(_State.pending)
            return
        time.sleep(0.2)


def _install() -> None:
    """Hold SIGINT / SIGTERM where their handlers are Python's defaults (main thread only, once)."""
    if _State.installed or threading.current_thread() is not threading.main_thread():
        return
    _State.installed = True
    defaults = {signal.SIGINT: (signal.default_int_handler,), signal.SIGTERM: (signal.SIG_DFL,)}
    for sig in _HELD:
        current = signal.getsignal(sig)
        if current in defaults[sig]:
            _State.previous[sig] = current
            signal.signal(sig, _handler)


def _device() -> torch.device:
    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree() -> None:
    """One all-reduce of every rank's held signal; raise on every rank when any rank holds one."""
    held = _State.pending
    flag = torch.tensor([_CODE.get(held, 0) if held is not None else 0], dtype=torch.int32, device=_device())
    try:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    except Exception as exc:
        if held is not None:  # a peer is gone: this rank still stops as asked
            _State.pending = None
            raise _interrupt(held, f"moreh_ap: {_NAME[held]}: this rank stops (the other ranks "
                                   f"could not be reached: {exc})") from exc
        after_failure(exc, "step boundary")
        raise
    code = int(flag.item())
    if code:
        signum = next(s for s, c in _CODE.items() if c == code)
        _State.pending, _State.agreed = None, signum
        raise _interrupt(signum, f"moreh_ap: {_NAME[signum]} on a rank: every rank stops here, before the same "
                                 "step (the script's except/finally run on every rank)")


@contextmanager
def step_boundary(what: str = "this call", *, agree: bool = True) -> Iterator[None]:
    """Around a moreh_ap step (a training or evaluation call of the model): on several ranks, raise at once
    after an earlier failure of this rank, then, with ``agree`` (a call that every rank makes together),
    agree on held signals (may raise ``KeyboardInterrupt`` / :class:`Terminated` on every rank). Does
    nothing on one process, nor inside another boundary (the one-line engine's call around ``train_step``)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1 or _State.busy:
        yield
        return
    check_usable(what)
    if agree:
        _install()
        _agree()
    _State.busy += 1
    try:
        yield
    finally:
        _State.busy -= 1


def after_failure(exc: BaseException, where: str) -> None:
    """A step of this rank raised ``exc`` on several ranks: return when this rank is the run's first failure
    (the caller re-raises it to the script), else wait to be stopped (never returns)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    first = on_step_failure(exc, where, rank=rank)
    if first is not None:
        wait_to_be_stopped(first, rank=rank)


def wait_to_be_stopped(first: FaultRecord, *, rank: int) -> None:
    """Wait for the launcher to end this rank (the cause's exit ends the run), bounded by
    ``MOREH_AP_DIST_TIMEOUT`` + 30 s; SIGTERM / SIGINT (a held one included) end it at once."""
    received = _State.pending
    for sig in _HELD:
        try:
            signal.signal(sig, signal.SIG_DFL)
        except ValueError:  # not the main thread: the launcher's stop (SIGKILL after a grace) still ends it
            pass
    if received is not None:
        os._exit(1)
    bound = exit_wait_s()
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        time.sleep(0.2)
    _say(f"[rank {rank}] moreh_ap: not stopped within {bound:g} s after {first.describe()}; this rank exits.\n")
    os._exit(1)
