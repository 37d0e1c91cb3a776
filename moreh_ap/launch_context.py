# torch's elastic process context as rank 0 of a self-launch uses it: per-rank files, rank 0's signal handlers kept.
"""Starting the children of a self-launch with ``torch.distributed.elastic.multiprocessing.start_processes``.

The context replaces the handlers of SIGTERM, SIGINT, SIGHUP and SIGQUIT in the calling process with its
own (they raise torch's ``SignalException``, which ``except KeyboardInterrupt`` does not catch): rank 0
is the user's script, so they are put back as they were once the children run; a signal that came while
the context's handlers were in place is then raised again, to the script's handler (Python's default:
Ctrl-C is a ``KeyboardInterrupt``, SIGTERM ends the process), never as torch's ``SignalException``. Its
poll logs a line per failure naming the child's local index; rank 0 reports the failure itself
(:mod:`moreh_ap.launch_report`), so that line is kept off the console (:func:`quiet_context`).
"""
from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager
from typing import Iterator

from moreh_ap.ranks import OWN_VARIABLES

__all__ = ["start_children", "quiet_context"]

_HANDLED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
"""The signals whose handlers torch's elastic process context replaces in the process that starts it."""
_CONTEXT_LOGGER = "torch.distributed.elastic.multiprocessing.api"


def start_children(command: list[str], *, envs: dict[int, dict[str, str]], log_dir: str | None):
    """Start ``command`` once per entry of ``envs`` (local index -> environment); their output goes to per-rank
    files in ``log_dir``, or to the console when it is None. Returns the elastic process context."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, start_processes
    from torch.distributed.elastic.multiprocessing.api import SignalException

    kept = _signal_handlers()
    try:
        return start_processes(
            name="moreh_ap",
            entrypoint=command[0],
            args=dict.fromkeys(envs, tuple(command[1:])),
            envs=envs,
            logs_specs=DefaultLogsSpecs() if log_dir is None else _rank_files(log_dir),
        )
    except SignalException as exc:  # a signal while the context's own handlers were in place
        received = exc.sigval
    finally:  # the script's own handlers come back (Python's: Ctrl-C is a KeyboardInterrupt)
        for sig, handler in kept.items():
            signal.signal(sig, handler)
    signal.raise_signal(received)  # as if it came now: Python's default acts (KeyboardInterrupt, SIGTERM ends)
    raise RuntimeError(f"moreh_ap: {received.name} arrived while the other ranks were being started; this "
                       "process's handler let the script go on, but the launch is incomplete: start the script again.")


@contextmanager
def quiet_context() -> Iterator[None]:
    """Keep the context's own failure log line off the console while it is polled."""
    log = logging.getLogger(_CONTEXT_LOGGER)
    before = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = before


def _signal_handlers() -> dict:
    """This process's current handlers of the signals torch's elastic process context takes over."""
    found = {}
    for name in _HANDLED:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not None:
            found[sig] = signal.getsignal(sig)
    return found


def _rank_files(log_dir: str):
    """torch elastic ``LogsSpecs``: every child's stdout and stderr redirected to files named by its rank."""
    from torch.distributed.elastic.multiprocessing import LogsDest, LogsSpecs, Std

    class RankFiles(LogsSpecs):
        def __init__(self) -> None:
            super().__init__(log_dir=log_dir, redirects=Std.ALL, tee=Std.NONE)

        @property
        def root_log_dir(self) -> str:
            return log_dir

        def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
            dest = LogsDest()
            for local, environ in envs.items():
                base = os.path.join(log_dir, f"rank{environ[OWN_VARIABLES['rank']]}")
                dest.stdouts[local], dest.stderrs[local] = base + ".stdout.log", base + ".stderr.log"
                dest.error_files[local] = environ["TORCHELASTIC_ERROR_FILE"] = base + ".error.json"
            return dest

    return RankFiles()
