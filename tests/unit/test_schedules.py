# The schedule registry against torch: each registered schedule's order is the order torch runs.
"""For every registered schedule, ``ScheduleSpec.order`` equals the forwards and backwards torch executes.

torch's schedules are built on recording stage stubs (no process group, no model): each stub has the
attributes the schedule constructors read (``stage_index``, ``num_stages``, ``group_size``,
``group_rank``, ``is_first``, ``is_last``, ``submod``), returns no communication ops, and records
``forward_one_chunk`` / ``backward_one_chunk`` as ``("F" | "B", local stage, micro-batch)``. The
stage initialisation (shape inference over p2p) is skipped; then the schedule's own
``_step_microbatches`` runs: ``ScheduleGPipe`` / ``Schedule1F1B``'s loops, and for
``ScheduleInterleaved1F1B`` the ``_PipelineScheduleRuntime`` executor walking its
``pipeline_order_with_comms``. So the test compares against what torch actually runs, rank by rank.

For the multi-stage schedules the test also reads ``pipeline_order`` (rank -> list of ``_Action`` or
None), keeps the compute actions and checks it too. For GPipe / 1F1B it does not read
``_get_pipeline_order()``: in torch 2.13 that IR is not what ``Schedule1F1B`` runs (on the last rank,
with no warm-up forward, its steady state starts at micro-batch 1 and ends at ``n``, one past the
last), so the executed order is the reference.
"""
from __future__ import annotations

import pytest
import torch
from torch.distributed.pipelining.schedules import _ComputationType

from moreh_ap.config import ParallelConfig
from moreh_ap.layout import ParallelLayout
from moreh_ap.schedules import SCHEDULES, get_schedule

pytestmark = pytest.mark.timeout(120)

PPS = (2, 4)
MICRO_BATCHES = (1, 2, 3, 4, 6, 8, 12)


class _RecordingStage:
    """A pipeline stage stub: records what the schedule runs on it, communicates nothing."""

    def __init__(self, log: list, *, stage_index: int, num_stages: int, pp: int, rank: int, local: int) -> None:
        self.log, self.local = log, local
        self.stage_index, self.num_stages = stage_index, num_stages
        self.group_size, self.group_rank = pp, rank
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.stage_index_to_group_rank: dict[int, int] = {}
        self.device = torch.device("cpu")
        self.submod = torch.nn.Module()

    def get_fwd_recv_ops(self, *a, **k):
        return []

    get_fwd_send_ops = get_bwd_recv_ops = get_bwd_send_ops = get_fwd_recv_ops

    def forward_one_chunk(self, mb: int, *a, **k) -> None:
        self.log.append(("F", self.local, mb))

    def backward_one_chunk(self, mb: int, *a, **k) -> None:
        self.log.append(("B", self.local, mb))

    def perform_reduce_grad(self, *a, **k) -> None:
        pass


def _torch_schedule(name: str, pp: int, n: int, spr: int, rank: int):
    """torch's schedule object for pipeline rank ``rank`` on recording stages, and the log they write."""
    spec = get_schedule(name)
    layout = ParallelLayout(world_size=pp, pp=pp, dp=1, stages_per_rank=spr, placement=spec.placement)
    log: list = []
    stages = [_RecordingStage(log, stage_index=s, num_stages=layout.total_stages, pp=pp, rank=rank, local=i)
              for i, s in enumerate(layout.stages_of(rank))]
    cls = spec.torch_schedule_class()
    sched = cls(stages, n, scale_grads=False) if spec.multi_stage else cls(stages[0], n, scale_grads=False)
    # no p2p shape inference: torch 2.13's single-stage schedules initialize through _initialize_pp_stages,
    # torch 2.11's through _initialize_stage; multi-stage ones through _initialize_stages on both
    sched._initialize_pp_stages = lambda *a, **k: (True, True)
    sched._initialize_stage = lambda *a, **k: None
    sched._initialize_stages = lambda *a, **k: None
    return sched, log, layout


def _executed(name: str, pp: int, n: int, spr: int, rank: int) -> list[tuple[str, int, int]]:
    sched, log, _ = _torch_schedule(name, pp, n, spr, rank)
    sched._step_microbatches([()] * n, [{}] * n)
    return log


def _cases():
    for name, spec in SCHEDULES.items():
        sprs = (2, 4) if spec.multi_stage else (1,)
        for pp in PPS:
            for n in MICRO_BATCHES:
                for spr in sprs:
                    try:
                        spec.check(pp, n, spr)
                    except ValueError:
                        continue
                    yield pytest.param(name, pp, n, spr, id=f"{name}-pp{pp}-n{n}-spr{spr}")


@pytest.mark.parametrize("name,pp,n,spr", list(_cases()))
def test_order_is_what_torch_runs(name, pp, n, spr):
    spec = get_schedule(name)
    for rank in range(pp):
        ours = spec.order(pp, n, spr, rank)
        assert ours == _executed(name, pp, n, spr, rank), f"{name} pp={pp} n={n} spr={spr} rank={rank}"
        assert sorted(ours) == sorted([(k, s, m) for k in "FB" for s in range(spr) for m in range(n)])


@pytest.mark.parametrize("name,pp,n,spr", [c for c in _cases() if get_schedule(c.values[0]).multi_stage])
def test_order_is_torch_pipeline_order(name, pp, n, spr):
    """Multi-stage schedules: the compute actions of torch's ``pipeline_order``, rank by rank."""
    kinds = {_ComputationType.FORWARD: "F", _ComputationType.FULL_BACKWARD: "B"}
    sched, _, layout = _torch_schedule(name, pp, n, spr, 0)
    for rank in range(pp):
        local = {s: i for i, s in enumerate(layout.stages_of(rank))}
        theirs = [(kinds[a.computation_type], local[a.stage_index], a.microbatch_index)
                  for a in sched.pipeline_order[rank] if a is not None and a.computation_type in kinds]
        assert get_schedule(name).order(pp, n, spr, rank) == theirs, f"rank {rank}"


def test_every_schedule_names_a_torch_class_and_a_valid_search():
    for name, spec in SCHEDULES.items():
        cls = spec.torch_schedule_class()
        assert cls.__name__.endswith(name)
        for spr in spec.planner_stages_per_rank:  # what the planner tries is accepted by the config
            ParallelConfig(num_stages=2, num_micro_batches=4, batch_per_device=1, schedule=name,
                           stages_per_rank=spr).validate(2, 4, 8)


def test_placement_matches_torch_stage_to_rank_mapping():
    from torch.distributed.pipelining.schedules import generate_stage_to_rank_mapping

    for name, spec in SCHEDULES.items():
        if not spec.multi_stage:
            continue
        for pp in PPS:
            for spr in (2, 4):
                layout = ParallelLayout(world_size=pp, pp=pp, dp=1, stages_per_rank=spr, placement=spec.placement)
                style = "loop" if spec.placement == "loop" else "v"
                theirs = generate_stage_to_rank_mapping(pp, pp * spr, style=style)
                assert {s: layout.stage_rank(s) for s in range(pp * spr)} == theirs


def test_bubble_is_pp_minus_one_over_stages_per_rank():
    """The cost model's bubble term: ``(pp - 1) / stages_per_rank`` micro-batch slots."""
    assert get_schedule("GPipe").bubble(4, 8, 1) == 3.0
    assert get_schedule("1F1B").bubble(4, 8, 1) == 3.0
    assert get_schedule("Interleaved1F1B").bubble(4, 8, 2) == 1.5
