# Pipeline schedule replay: the distinct backwards of a rank in its schedule's order (from the registry).
"""What the memory model needs from a pipeline schedule: the backwards a rank runs, summarised.

The order of a rank's forwards and backwards is the schedule registry's
(``moreh_ap.schedules.get_schedule(name).order``, checked against torch's own order by the
tests); this module replays it and keeps, per kind of backward, only the moments that can be
the rank's worst.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from moreh_ap.schedules import get_schedule

__all__ = ["BackwardMoment", "backward_moments"]


@dataclass(kw_only=True, slots=True, frozen=True)
class BackwardMoment:
    """One kind of backward of a pipeline rank, with the micro-batches in flight around it."""

    local: int
    """Local stage (index among the rank's stages) running the backward."""
    in_flight: tuple[int, ...]
    """Per local stage: micro-batches forwarded and not yet backwarded, besides this one."""
    done: frozenset[int]
    """Local stages that ran a backward before this one."""
    fwd_between: bool
    """Whether a forward ran since the previous backward (it reshards a ZeRO-3 stage)."""


@lru_cache(maxsize=4096)
def backward_moments(schedule: str, n: int, pp: int, spr: int, rank: int) -> tuple[BackwardMoment, ...]:
    """The distinct backwards of pipeline rank ``rank`` in the schedule's order, independent of sizes.

    Args:
        schedule: a registered schedule name.
        n: micro-batches per step.
        pp: pipeline ranks.
        spr: virtual stages per rank.
        rank: the pipeline rank.
    """
    counts = [0] * spr
    done: set[int] = set()
    fwd_between = True
    seen: dict[tuple, set[tuple[int, ...]]] = {}
    for kind, local, _ in get_schedule(schedule).order(pp, n, spr, rank):
        if kind == "F":
            counts[local] += 1
            fwd_between = True
            continue
        counts[local] -= 1
        key = (local, frozenset(done), fwd_between)
        done.add(local)
        fwd_between = False
        seen.setdefault(key, set()).add(tuple(counts))
    out = []
    for (local, done_before, between), vectors in seen.items():
        # only micro-batch counts that no other one of the same kind of backward dominates can be the worst
        kept: list[tuple[int, ...]] = []
        for v in sorted(vectors, key=sum, reverse=True):  # a dominating vector has a larger sum: seen first
            if not any(all(x >= y for x, y in zip(w, v)) for w in kept):
                kept.append(v)
                out.append(BackwardMoment(local=local, in_flight=v, done=done_before, fwd_between=between))
    return tuple(out)
