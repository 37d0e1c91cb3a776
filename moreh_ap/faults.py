# Who failed first: a failed step is claimed in the rendezvous store; the first rank is the cause, the others stop.
"""What a rank does when a step fails on several ranks (called by :mod:`moreh_ap.runtime.failure`).

A rank whose step raises claims the run's failure in the process group's store (one atomic
compare-and-set: the first claim wins and is kept):

- The first rank to claim is the *cause*. It prints one line on its stderr, writes its traceback to its
  torch elastic error file (``TORCHELASTIC_ERROR_FILE``, set by torchrun and by the self-launcher for
  its children; :class:`torch.distributed.elastic.multiprocessing.errors.ErrorHandler`, the writer of
  ``@record``), and the exception goes on to the script (its ``except`` / ``finally`` run). Every later
  moreh_ap call that would communicate on this rank raises at once (:func:`check_usable`): a peer may
  still wait in the collective this rank left, and gloo cannot be aborted.
- A rank that finds another rank's claim (its own error is a consequence: "Connection closed by
  peer", a timeout) is *stopped*: it prints one line, writes an error file that says it was stopped by
  that rank (dated after the cause, so that torchrun, which names the failure with the earliest date
  as the root cause, names the right rank), and waits to be ended by its launcher (torchrun's agent,
  or rank 0 of a self-launch once the cause has exited), at most ``MOREH_AP_DIST_TIMEOUT`` + 30 s;
  its script does not go on.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch.distributed as dist
__all__ = ["FaultRecord", "StoppedRankError", "on_step_failure", "check_usable", "known_failure", "STOPPED_KEY"]

_KEY = "moreh_ap/first_failure"
_STORE_WAIT_S = 3.0
STOPPED_KEY = "moreh_ap_stopped_by"
"""The key, in a stopped rank's error file (``message.extraInfo``), that holds the rank that stopped it."""


class StoppedRankError(RuntimeError):
    """A moreh_ap call that would communicate after a step of this run failed (the ranks are out of step)."""


@dataclass(kw_only=True, slots=True)
class FaultRecord:
    """A failed step, as claimed in the store."""

    rank: int
    """The rank whose step failed."""
    where: str
    """What ran (``"train_step"``, ``"parallelize"``, ...)."""
    error: str
    """``Type: message`` of its exception (first line, at most 300 characters)."""
    time: float
    """When it failed (seconds since the epoch)."""

    def describe(self) -> str:
        return f"rank {self.rank} failed first in {self.where} ({self.error})"


_local: FaultRecord | None = None
"""This rank's own failure (a step of this rank raised), or None."""


def known_failure() -> FaultRecord | None:
    """The failure this rank has seen (its own step's), or None."""
    return _local


def check_usable(what: str) -> None:
    """Raise at once when a step of this rank failed earlier: the ranks can no longer communicate.

    Raises:
        StoppedRankError: naming the earlier failure and the way out.
    """
    if _local is not None:
        raise StoppedRankError(
            f"moreh_ap: {what} cannot run: {_local.where} failed on this rank (rank {_local.rank}: {_local.error}); "
            "the ranks are out of step and can no longer communicate. Let the exception end the script "
            "(the other ranks are stopped), fix the cause and resume from the last checkpoint.")


def _error_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _store():
    try:
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except Exception:
        return None


def _claim(record: FaultRecord) -> FaultRecord | None:
    """The first failure of the run: ``record`` if this rank claimed first, a peer's record if that came first,
    None when the store cannot be reached within a few seconds (its host may be gone)."""
    store = _store()
    if store is None:
        return None
    mine = json.dumps(asdict(record))
    box: list = []

    def ask() -> None:
        try:
            box.append(store.compare_set(_KEY, "", mine))
        except Exception:
            pass

    thread = threading.Thread(target=ask, name="moreh_ap-fault-claim", daemon=True)
    thread.start()
    thread.join(_STORE_WAIT_S)
    if not box:
        return None
    try:
        value = box[0].decode() if isinstance(box[0], bytes) else str(box[0])
        return FaultRecord(**json.loads(value))
    except (ValueError, TypeError):
        return None


def on_step_failure(exc: BaseException, where: str, *, rank: int) -> FaultRecord | None:
    """Claim the run's failure for ``exc`` (this rank's step raised it).

    Args:
        exc: the exception the step raised (being handled: its traceback is recorded).
        where: what ran.
        rank: this rank.

    Returns:
        None when this rank is the cause (the caller re-raises), else the peer's failure that came first
        (the caller stops this rank: :func:`moreh_ap.signals.wait_to_be_stopped`).
    """
    global _local
    record = FaultRecord(rank=rank, where=where, error=_error_line(exc), time=time.time())
    first = _claim(record)
    _local = record
    if first is None or first.rank == rank:
        _write_cause_file(exc)
        _say(f"[rank {rank}] moreh_ap: {where} failed ({record.error}); the exception goes on to the script "
             "and the other ranks are stopped.\n")
        return None
    _write_stopped_file(first, record)
    _say(f"[rank {rank}] moreh_ap: {where} stopped: {first.describe()}; this rank's own error is a consequence "
         f"({record.error}). This rank waits to be stopped.\n")
    return first


def _say(text: str) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.write(text)
        sys.stderr.flush()
    except Exception:
        pass


def _write_cause_file(exc: BaseException) -> None:
    """This rank's traceback in its torch elastic error file, written by torch's own ``ErrorHandler``."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    try:
        ErrorHandler().record_exception(exc)
    except Exception as problem:  # an unwritable file must not hide the step's own error
        _say(f"moreh_ap: could not write the error file: {problem}\n")


def _write_stopped_file(first: FaultRecord, mine: FaultRecord) -> None:
    """An error file in torch elastic's format that says this rank was stopped, dated after the cause."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    note = (f"moreh_ap: rank {mine.rank} was stopped: {first.describe()}; see rank {first.rank}'s traceback. "
            f"This rank's own error was a consequence: {mine.error}\n")
    data = {"message": {"message": f"stopped: {first.describe()}", "extraInfo": {
        "py_callstack": note, "timestamp": str(max(int(time.time()), int(first.time) + 1)),
        STOPPED_KEY: first.rank}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError as problem:
        _say(f"moreh_ap: could not write the error file {path}: {problem}\n")
