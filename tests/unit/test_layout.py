# ParallelLayout and the schedule registry: ranks, stage placement, ranges, groups (pure, one process).
import pytest

from moreh_ap.config import ParallelConfig
from moreh_ap.layout import ParallelLayout, stage_ranges
from moreh_ap.schedules import SCHEDULES, get_schedule, rank_stages, stage_rank


def test_rank_coords_roundtrip_tp_innermost():
    lay = ParallelLayout(world_size=8, pp=2, dp=2, tp=2)
    for r in range(8):
        c = lay.coords(r)
        assert lay.rank(pp=c.pp, dp=c.dp, tp=c.tp) == r
    assert lay.tp_group_ranks(pp=0, dp=1) == [2, 3]
    assert lay.dp_group_ranks(pp=1, tp=0) == [4, 6]
    assert lay.pp_group_ranks(dp=1, tp=1) == [3, 7]
    assert lay.mesh_dim_names == ("pp", "dp", "tp") and lay.mesh_shape == (2, 2, 2)


def test_from_config_and_arithmetic_errors():
    cfg = ParallelConfig(num_stages=2, num_micro_batches=4, batch_per_device=1, schedule="Interleaved1F1B",
                         stages_per_rank=2)
    lay = ParallelLayout.from_config(cfg, 4)
    assert (lay.pp, lay.dp, lay.tp, lay.total_stages) == (2, 2, 1, 4)
    assert lay.stages_of(0) == [0, 2] and lay.stages_of(1) == [1, 3]
    assert [lay.stage_rank(s) for s in range(4)] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match=r"world_size\(3\) is not a multiple of num_stages\(2\)"):
        ParallelLayout.from_config(cfg, 3)
    with pytest.raises(ValueError, match=r"num_stages\(2\) \* dp\(2\) \* tp\(1\) != world_size\(3\)"):
        ParallelLayout(world_size=3, pp=2, dp=2)


def test_stage_ranges_balanced_and_given():
    assert stage_ranges(10, 4, None) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert stage_ranges(10, 1, None) == [(0, 10)]
    assert stage_ranges(6, 3, (1, 5)) == [(0, 1), (1, 5), (5, 6)]


def test_v_placement_zigzag():
    assert [stage_rank(s, 3, "v") for s in range(6)] == [0, 1, 2, 2, 1, 0]
    assert rank_stages(0, 3, 6, "v") == [0, 5]


def test_spans_nodes():
    lay = ParallelLayout(world_size=16, pp=2, dp=4, tp=2)
    assert lay.spans_nodes(8) == (False, True, False)
    assert lay.spans_nodes(4) == (True, True, False)


def test_registry_resolves_torch_classes():
    for name, spec in SCHEDULES.items():
        cls = spec.torch_schedule_class()
        assert cls.__name__.lower().endswith(name.lower())
    with pytest.raises(ValueError, match="expected one of GPipe, 1F1B, Interleaved1F1B"):
        get_schedule("ZeroBubble")
