# Watchdogs of a self-launch: no rank outlives rank 0 (children watch their launcher; rank 0 bounds its wait).
"""Two bounds that keep a self-launched run from leaving processes behind.

- In each child rank (1..G-1), :func:`watch_launcher` starts a daemon thread that ends the child
  (exit code 1, a line on its stderr) as soon as its launcher, rank 0, is gone, whatever ended rank 0
  (a normal exit, ``os._exit``, a signal). The child's parent is rank 0 (torch elastic starts it
  directly), so a changed parent process id means rank 0 exited.
- Rank 0, leaving normally, waits for its children at most :func:`exit_wait_s` seconds
  (``MOREH_AP_DIST_TIMEOUT`` + 30: a child that finishes its last collective with rank 0 leaves well
  within it) and then stops the ones still running (:mod:`moreh_ap.launcher`).
"""
from __future__ import annotations

import os
import sys
import threading
import time

from moreh_ap import env as _env
from moreh_ap.ranks import identity

__all__ = ["EXIT_GRACE_S", "exit_wait_s", "watch_launcher", "running_ranks"]

EXIT_GRACE_S = 30.0
"""Seconds beyond ``MOREH_AP_DIST_TIMEOUT`` that rank 0 waits for its children when it leaves."""
_POLL_S = 0.5
_watching: list[threading.Thread] = []


def exit_wait_s() -> float:
    """How long rank 0, leaving, waits for its children: ``MOREH_AP_DIST_TIMEOUT`` + :data:`EXIT_GRACE_S`."""
    try:
        return _env.read_env().dist_timeout_s + EXIT_GRACE_S
    except ValueError:
        return 60.0 + EXIT_GRACE_S


def watch_launcher() -> bool:
    """In a child rank of a self-launch, end this process when rank 0 is gone (at most once per process).

    Returns:
        True when a watch runs (this is a self-launched rank > 0), else False.
    """
    try:
        found = identity()
    except ValueError:
        return False
    if found is None or found.source != "moreh_ap" or found.rank == 0:
        return False
    if not _watching:
        parent = os.getppid()
        thread = threading.Thread(target=_watch, args=(parent, found.rank), name="moreh_ap-rank0-watch",
                                  daemon=True)
        _watching.append(thread)
        thread.start()
    return True


def _watch(parent: int, rank: int) -> None:
    while os.getppid() == parent:
        time.sleep(_POLL_S)
    sys.stderr.write(f"moreh_ap: rank {rank}: rank 0 (pid {parent}), which launched this rank, is gone; "
                     "this rank stops.\n")
    sys.stderr.flush()
    os._exit(1)


def running_ranks(context) -> list[int]:
    """The global ranks (local index + 1) of a torch elastic subprocess context's children still running."""
    handlers = getattr(context, "subprocess_handlers", {}) or {}
    return sorted(local + 1 for local, handler in handlers.items() if handler.proc.poll() is None)
