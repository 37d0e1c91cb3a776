# Candidate enumeration: every ParallelConfig validate() accepts for the world, batch and options.
from __future__ import annotations

from moreh_ap.ap_options import APOptions
from moreh_ap.config import ParallelConfig
from moreh_ap.schedules import SCHEDULES

SCHEDULE_CHOICES = tuple((s.name, spr) for s in SCHEDULES.values() for spr in s.planner_stages_per_rank)
"""(schedule, stages_per_rank) pairs tried for pipelines of 2+ stages: each registered schedule with
each of its ``planner_stages_per_rank``."""


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n`` in increasing order."""
    small, large = [], []
    i = 1
    while i * i <= n:
        if n % i == 0:
            small.append(i)
            if i != n // i:
                large.append(n // i)
        i += 1
    return small + large[::-1]


def _dist_modes(option, dp: int) -> list[tuple[bool, bool]]:
    modes = [(False, False), (True, False), (True, True)]
    if option is True:
        modes = modes[1:]
    elif option is False:
        modes = modes[:1]
    return modes


def enumerate_candidates(
    *, world_size: int, global_batch: int, num_blocks: int, options: APOptions | None = None,
    supports_pipeline: bool = True, tp_degrees: list[int] | tuple[int, ...] = (1,),
) -> list[ParallelConfig]:
    """All configurations worth evaluating, each accepted by ``ParallelConfig.validate``.

    Search space: pipeline stages (divisors of the world size, at most
    ``options.num_stages`` when it is an int, 1 when ``pipeline_parallel`` is
    False, the model has no blocks or the runtime cannot pipeline it), micro-batch counts (divisors of the
    per-replica batch, fixed when ``options.num_micro_batches`` is an int),
    recomputation on/off, the three data-parallel modes (none, ZeRO-2-like,
    ZeRO-3-like), and for pipelines every registered schedule with the
    virtual stages per rank it lists (:data:`SCHEDULE_CHOICES`; today GPipe,
    1F1B, Interleaved1F1B with 2 and 4), and the tensor-parallel degrees ``tp_degrees`` (``world_size`` a
    multiple of ``num_stages * tp``; :func:`moreh_ap.planner.tp.tp_degrees` picks them).

    Args:
        world_size: ranks.
        global_batch: samples per optimizer step over all ranks.
        num_blocks: pipeline-splittable blocks of the model (0 = none).
        options: the user's restrictions (default: all 'auto').
        supports_pipeline: whether the runtime can cut the model into stages (``ModelGraph.supports_pipeline``);
            False: no candidate with ``num_stages > 1`` (the planner never plans what the runtime cannot run).
        tp_degrees: tensor-parallel degrees to try (default: 1 only).
    """
    options = options if options is not None else APOptions()
    if global_batch < 1:
        raise ValueError(f"global_batch={global_batch!r} is not valid: expected an integer >= 1")
    max_pp = 1 if (not options.pipeline_parallel or num_blocks < 2 or not supports_pipeline) else world_size
    if isinstance(options.num_stages, int):
        max_pp = min(max_pp, options.num_stages)
    recomputes = [False, True] if options.activation_recomputation == "auto" else [options.activation_recomputation]
    out: list[ParallelConfig] = []
    for tp, pp in [(t, p) for t in tp_degrees for p in divisors(world_size)]:
        if pp > max_pp or (num_blocks and pp > num_blocks) or world_size % (pp * tp):
            continue
        dp = world_size // (pp * tp)
        if global_batch % dp:
            continue
        per_dp = global_batch // dp
        nmbs = divisors(per_dp)
        if isinstance(options.num_micro_batches, int):
            nmbs = [options.num_micro_batches] if options.num_micro_batches in nmbs else []
        schedules = [("1F1B", 1)] if pp == 1 else list(SCHEDULE_CHOICES)
        for nmb in nmbs:
            for schedule, spr in schedules:
                for rec in recomputes:
                    for dist_p, dist_low in _dist_modes(options.distribute_parameter, dp):
                        cfg = ParallelConfig(
                            num_stages=pp,
                            num_micro_batches=nmb,
                            batch_per_device=per_dp // nmb,
                            recomputation=rec,
                            distribute_param=dist_p,
                            distribute_low_prec_param=dist_low,
                            mixed_precision=options.mixed_precision,
                            schedule=schedule,
                            stages_per_rank=spr,
                            tp=tp,
                        )
                        try:
                            cfg.validate(world_size, global_batch, num_blocks or None)
                        except ValueError:
                            continue
                        out.append(cfg)
    return out
