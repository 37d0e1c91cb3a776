# The failure policy: a failed step reaches the script on its rank, the run's first failure is named, peers stop.
"""What happens when a rank raises inside ``parallelize`` or a training / evaluation step.

The exception always goes on to the caller, so the script's own ``except`` / ``finally`` run on the
rank where it happened. On several ranks, before that, the failure is claimed as the run's first
(:mod:`moreh_ap.faults`: one line on stderr, the traceback in the torch elastic error file, later
moreh_ap calls on this rank raise at once); a rank whose error is the consequence of a peer's earlier
failure (a closed connection, a timeout) is stopped instead (:func:`moreh_ap.signals.after_failure`).
Errors that describe the user's call (:class:`moreh_ap.errors.InputError`, raised the same way on
every rank before any collective) are raised as they are. ``MOREH_AP_EXIT_ON_ERROR`` no longer
changes this (it is accepted and ignored).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from moreh_ap.errors import InputError
from moreh_ap.runtime.dist import world_size
from moreh_ap.signals import after_failure

__all__ = ["fail", "failure_policy", "block_list_hint"]


def fail(exc: BaseException, where: str, hint: str = "") -> None:
    """Handle ``exc``, raised by a step of this rank: note the hint on it, and on several ranks claim the run's
    failure (return: the caller re-raises) or stop this rank when a peer failed first (no return).

    Args:
        exc: the exception being handled.
        where: what ran (e.g. ``"train_step"``).
        hint: a line that tells how to fix a known cause, or ``""``; added as a note to ``exc``.
    """
    if hint and hint.rstrip() not in getattr(exc, "__notes__", ()):
        exc.add_note(hint.rstrip())
    if world_size() > 1:
        after_failure(exc, where)


@contextmanager
def failure_policy(where: str, *, user_errors: tuple[type[BaseException], ...] = (InputError,),
                   hint: Callable[[BaseException], str] | None = None) -> Iterator[None]:
    """Run the body under the failure policy.

    Args:
        where: what runs (shown in the message, e.g. ``"train_step"``).
        user_errors: exception types raised to the caller as they are (the user's call was wrong).
        hint: ``hint(exc)``: a line for exceptions other than ``ValueError`` / ``TypeError`` (e.g. how to
            fix a model's forward), or ``""``.
    """
    try:
        yield
    except user_errors:
        raise
    except (ValueError, TypeError) as exc:
        fail(exc, where)
        raise
    except BaseException as exc:
        fail(exc, where, hint(exc) if hint is not None else "")
        raise


def block_list_hint(exc: BaseException, *, pipelined: bool, split_name: str) -> str:
    """The hint for a pipelined torchtitan-style model whose forward does not skip the ``None`` children."""
    if pipelined and split_name.startswith("block list") and "NoneType" in str(exc):
        return ("hint: this model was split as a torchtitan-style block list: on a pipeline stage the "
                "children before/after `layers` that live on other stages are None, and the model's "
                "forward must skip them (e.g. `h = self.tok_emb(x) if self.tok_emb is not None else x`)\n")
    return ""
