# The failure policy: a rank that fails shows its traceback and leaves at once; the user's own mistakes propagate.
"""What happens when a rank raises inside ``parallelize`` or a training / evaluation step.

A rank that fails half-way through a collective would leave its peers waiting until the process
group's timeout. So, on several ranks, an unexpected exception is printed with this rank's
traceback (and a hint when one is known) and the process exits at once (``os._exit(1)``); the
peers then fail fast on the closed connection. Errors that describe the user's call
(:class:`moreh_ap.errors.InputError`, raised the same way on every rank before any collective) are
raised to the caller. ``MOREH_AP_EXIT_ON_ERROR=0`` keeps the process alive (the exception is raised).
"""
from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator

import torch.distributed as dist

from moreh_ap.env import exit_on_error
from moreh_ap.errors import InputError
from moreh_ap.runtime.dist import world_size

__all__ = ["fail", "failure_policy", "block_list_hint"]


def fail(exc: BaseException, where: str, hint: str = "") -> None:
    """Show this rank's traceback, then leave at once so peers see a closed connection instead of hanging.

    Does nothing for one process or with ``MOREH_AP_EXIT_ON_ERROR=0`` (the caller re-raises).
    """
    if world_size() > 1 and exit_on_error():
        r = dist.get_rank()
        sys.stderr.write(f"[rank {r}] moreh_ap: {where} failed:\n{''.join(traceback.format_exception(exc))}{hint}")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)


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
