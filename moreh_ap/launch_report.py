# What rank 0 of a self-launch prints when a child fails: the rank that failed first, with its traceback.
"""Reports of a self-launch's failed children (:mod:`moreh_ap.launcher`).

The rank named is the run's first failure: a child whose torch elastic error file says it was stopped
by another rank (:mod:`moreh_ap.faults`) comes after every other, and so does one ended by a signal;
among the rest the earliest error file wins. Its traceback comes from its error file (written by
moreh_ap on a failed step, or by ``@record``), else from the end of its stderr file.
"""
from __future__ import annotations

import os
import signal

from moreh_ap.faults import STOPPED_KEY

__all__ = ["failure_text", "first_failure", "report", "only_interrupts"]

_TAIL_LINES = 80
"""Lines of a failed rank's stderr file shown on rank 0's console (its traceback is at the end)."""
_TAIL_CHARS = 16000


def _stopped_by(failure) -> int | None:
    data = failure.error_file_data if isinstance(failure.error_file_data, dict) else {}
    message = data.get("message")
    extra = message.get("extraInfo", {}) if isinstance(message, dict) else {}
    return extra.get(STOPPED_KEY) if isinstance(extra, dict) else None


def first_failure(result) -> tuple[int, object]:
    """``(local index, ProcessFailure)`` of the child that failed first (see the module's docstring)."""
    return min(result.failures.items(),
               key=lambda item: (_stopped_by(item[1]) is not None, item[1].exitcode < 0, item[1].timestamp))


def only_interrupts(result) -> bool:
    """Every failed child ended as an interrupted script does: ``KeyboardInterrupt`` (killed by SIGINT, 130),
    ``moreh_ap.signals.Terminated`` (exit code 1: Python's rule for any other exception) or SIGTERM."""
    stops = {1, -signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGTERM}
    return all(f.exitcode in stops for f in result.failures.values())


def failure_text(failure, stderr_path: str | None) -> tuple[str, str]:
    """``(traceback, where from)`` of a failed child: its torch elastic error file (written by ``@record``),
    else the tail of its stderr file; ``("", "")`` when neither has anything."""
    data = None
    if os.path.isfile(failure.error_file) and isinstance(failure.error_file_data, dict):
        data = failure.error_file_data.get("message")
    if isinstance(data, dict) and data.get("extraInfo", {}).get("py_callstack"):
        return str(data["extraInfo"]["py_callstack"]).rstrip() + "\n", failure.error_file
    if isinstance(data, str) and data:
        return data.rstrip() + "\n", failure.error_file
    if not stderr_path or not os.path.isfile(stderr_path):
        return "", ""
    with open(stderr_path, errors="replace") as f:
        text = "".join(f.readlines()[-_TAIL_LINES:])[-_TAIL_CHARS:]
    if not text.strip():
        return "", ""
    return (text if text.endswith("\n") else text + "\n"), f"end of {stderr_path}"


def report(result, *, world: int, log_dir: str | None, stream) -> None:
    """Name the rank that failed first (the others were stopped because of it) on ``stream``."""
    local, first = first_failure(result)
    rank = local + 1
    if log_dir is None:  # MOREH_AP_RANK_OUTPUT=all: the traceback is on the shared console already
        stream.write(
            f"moreh_ap: rank {rank} of {world} failed (exit code {first.exitcode}); "
            f"stopping the other ranks. See rank {rank}'s traceback above.\n"
        )
    else:
        path = result.stderrs.get(local) or os.path.join(log_dir, f"rank{rank}.stderr.log")
        text, source = failure_text(first, path)
        shown = f"its traceback ({source}):\n{text}" if text else f"it wrote nothing to {path}\n"
        stream.write(
            f"moreh_ap: rank {rank} of {world} failed (exit code {first.exitcode}); "
            f"stopping the other ranks; {shown}"
            f"moreh_ap: rank {rank} of {world} failed; every rank's output is in {log_dir}\n"
        )
    stream.flush()
