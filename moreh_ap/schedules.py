# The schedule registry: one entry per pipeline schedule (torch class, placement, rule, bubble, order).
"""Everything the library knows about a pipeline schedule, in one place.

Each :class:`ScheduleSpec` gives:

- ``torch_class``: the name of torch's schedule class (``torch.distributed.pipelining``), resolved
  by :meth:`ScheduleSpec.torch_schedule_class` through torch's own ``get_schedule_class``;
- ``multi_stage``: whether the class takes a list of stages (one per virtual stage of a rank);
- ``placement``: how virtual stages map to pipeline ranks (``"loop"``: stage ``s`` on rank
  ``s % pp``; ``"v"``: stage ``s`` on rank ``s`` then back, ``2 * pp - 1 - s``);
- ``check(pp, n, spr)``: the schedule's own validity rule (raises ``ValueError`` with the arithmetic);
- ``bubble(pp, n, spr)``: the idle fraction of one micro-batch slot count (``slots idle``);
- ``order(pp, n, spr, rank)``: the forwards and backwards a rank runs, in torch's order;
- ``planner_stages_per_rank``: the ``stages_per_rank`` values the planner searches with it.

Adding a schedule is adding one entry to :data:`SCHEDULES` (see ``docs/extending.md``). This
module imports nothing from ``moreh_ap`` (the config, the planner and the runtime all read it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["ScheduleSpec", "SCHEDULES", "get_schedule", "schedule_names", "stage_rank", "rank_stages"]

Op = tuple[str, int, int]
"""One step of a rank's order: ``("F" | "B", local stage, micro-batch)``."""


@dataclass(kw_only=True, slots=True, frozen=True)
class ScheduleSpec:
    """One registered pipeline schedule."""

    name: str
    """The name used in ``ParallelConfig.schedule`` (and in logs)."""
    torch_class: str
    """Name of torch's schedule class, as ``torch.distributed.pipelining.schedules.get_schedule_class`` knows it."""
    multi_stage: bool
    """True when the class takes several stages per rank (virtual stages); False: exactly one."""
    placement: str
    """Virtual stage to rank rule: ``"loop"`` (``s % pp``) or ``"v"`` (zig-zag)."""
    check: Callable[[int, int, int], None]
    """``check(pp, num_micro_batches, stages_per_rank)``: raises ``ValueError`` when torch would reject it."""
    bubble: Callable[[int, int, int], float]
    """``bubble(pp, num_micro_batches, stages_per_rank)``: idle micro-batch slots of the slowest rank."""
    order: Callable[[int, int, int, int], list[Op]]
    """``order(pp, num_micro_batches, stages_per_rank, rank)``: this rank's forwards/backwards in torch's order."""
    planner_stages_per_rank: tuple[int, ...] = (1,)
    """The ``stages_per_rank`` values the planner tries with this schedule for pipelines of 2+ stages
    (empty: the planner never picks it)."""

    def torch_schedule_class(self) -> type:
        """torch's schedule class for this entry."""
        from torch.distributed.pipelining.schedules import get_schedule_class

        return get_schedule_class(self.torch_class)


# ---------------------------------------------------------------------------------------- rules
def _check_gpipe(pp: int, n: int, spr: int) -> None:
    if spr > 1:
        raise ValueError(f"stages_per_rank({spr}) > 1 needs schedule='Interleaved1F1B', not 'GPipe'")


def _check_1f1b(pp: int, n: int, spr: int) -> None:
    if spr > 1:
        raise ValueError(f"stages_per_rank({spr}) > 1 needs schedule='Interleaved1F1B', not '1F1B'")
    if pp > 1 and n < pp:
        raise ValueError(f"schedule '1F1B' needs num_micro_batches({n}) >= num_stages({pp})")


def _check_interleaved(pp: int, n: int, spr: int) -> None:
    if pp == 1:
        return
    if spr < 2:
        raise ValueError(
            f"schedule 'Interleaved1F1B' needs stages_per_rank >= 2 (got {spr}); use '1F1B' for one stage per rank"
        )
    rounds = max(1, n // pp)
    if n % rounds:
        raise ValueError(
            f"schedule 'Interleaved1F1B' needs num_micro_batches({n}) to be a multiple of "
            f"its rounds max(1, num_micro_batches({n}) // num_stages({pp})) = {rounds}"
        )


# ---------------------------------------------------------------------------------------- orders
def _order_gpipe(pp: int, n: int, spr: int, rank: int) -> list[Op]:
    """Every forward, then every backward (torch's ``ScheduleGPipe``)."""
    return [("F", 0, i) for i in range(n)] + [("B", 0, i) for i in range(n)]


def _order_1f1b(pp: int, n: int, spr: int, rank: int) -> list[Op]:
    """``min(n, pp - rank)`` warm-up forwards, backward / forward pairs, the remaining backwards."""
    w = min(n, pp - rank)
    order: list[Op] = [("F", 0, i) for i in range(w)]
    for i in range(n):
        order.append(("B", 0, i))
        if w + i < n:
            order.append(("F", 0, w + i))
    return order


def _order_interleaved(pp: int, n: int, spr: int, rank: int) -> list[Op]:
    """torch's ``_get_warmup_ops`` / ``_get_1f1b_rank_ops`` for ``ScheduleInterleaved1F1B``.

    ``(spr - 1) * mb_per_round + 2 * (pp - 1 - rank)`` warm-up forwards (capped), local stages taken
    ``mb_per_round`` micro-batches at a time (forwards in increasing, backwards in decreasing stage
    order), then forward / backward pairs, then the remaining backwards.
    """
    per_round = n // max(1, n // pp)
    total = spr * n
    warmup = min((spr - 1) * per_round + 2 * (pp - 1 - rank), total)
    fwd_next, bwd_next = [0] * spr, [0] * spr
    order: list[Op] = []

    def fwd(step: int) -> None:
        local = (step // per_round) % spr
        order.append(("F", local, fwd_next[local]))
        fwd_next[local] += 1

    def bwd(step: int) -> None:
        local = spr - 1 - ((step - warmup) // per_round) % spr
        order.append(("B", local, bwd_next[local]))
        bwd_next[local] += 1

    for step in range(warmup):
        fwd(step)
    for step in range(warmup, total):
        fwd(step)
        bwd(step)
    for step in range(total, total + warmup):
        bwd(step)
    return order


# ---------------------------------------------------------------------------------------- registry
SCHEDULES: dict[str, ScheduleSpec] = {
    s.name: s
    for s in (
        ScheduleSpec(name="GPipe", torch_class="GPipe", multi_stage=False, placement="loop",
                     check=_check_gpipe, bubble=lambda pp, n, spr: float(pp - 1), order=_order_gpipe),
        ScheduleSpec(name="1F1B", torch_class="1F1B", multi_stage=False, placement="loop",
                     check=_check_1f1b, bubble=lambda pp, n, spr: float(pp - 1), order=_order_1f1b),
        ScheduleSpec(name="Interleaved1F1B", torch_class="Interleaved1F1B", multi_stage=True, placement="loop",
                     check=_check_interleaved, bubble=lambda pp, n, spr: (pp - 1) / spr,
                     order=_order_interleaved, planner_stages_per_rank=(2, 4)),
    )
}
"""Every schedule the library can plan and run, by name."""


def schedule_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(SCHEDULES)


def get_schedule(name: str) -> ScheduleSpec:
    """The registered schedule ``name``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the accepted names).
    """
    spec = SCHEDULES.get(name)
    if spec is None:
        raise ValueError(f"schedule={name!r} is not valid: expected one of {', '.join(SCHEDULES)}")
    return spec


def stage_rank(stage: int, pp: int, placement: str = "loop") -> int:
    """The pipeline rank that holds virtual stage ``stage`` under ``placement``."""
    if placement == "loop":
        return stage % pp
    if placement == "v":
        s = stage % (2 * pp)
        return s if s < pp else 2 * pp - 1 - s
    raise ValueError(f"placement={placement!r} is not valid: expected 'loop' or 'v'")


def rank_stages(pp_rank: int, pp: int, total_stages: int, placement: str = "loop") -> list[int]:
    """The virtual stages held by pipeline rank ``pp_rank``, in increasing order."""
    return [s for s in range(total_stages) if stage_rank(s, pp, placement) == pp_rank]
