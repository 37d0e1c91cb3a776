# Tests of ParallelConfig: validation arithmetic, schedule rules, the seed's line and dicts.
import json

import pytest

from moreh_ap import ParallelConfig
from moreh_ap.config import balanced_boundaries

SEED_LINE = (
    "num_stages : 2, num_micro_batches : 4, batch_per_device : 1, No TP, recomputation : 0, "
    "distribute_param : true, distribute_low_prec_param : false"
)


def cfg(**kw):
    base = dict(num_stages=1, num_micro_batches=1, batch_per_device=1)
    base.update(kw)
    return ParallelConfig(**base)


def test_seed_line_round_trip():
    c = cfg(num_stages=2, num_micro_batches=4, distribute_param=True)
    assert c.to_moreh_line() == SEED_LINE
    assert str(c) == SEED_LINE
    assert ParallelConfig.from_moreh_line(SEED_LINE) == c
    # the seed's case: 4 devices, global batch 8 -> dp 2
    assert c.validate(4, global_batch=8, num_blocks=40) is c
    assert c.dp(4) == 2 and c.global_batch(4) == 8


def test_line_with_log_prefix_and_tp():
    c = ParallelConfig.from_moreh_line("[2024-04-15 14:07:09.729] [info] " + SEED_LINE)
    assert c.num_stages == 2
    t = cfg(tp=2, recomputation=True)
    assert "TP : 2" in t.to_moreh_line() and "recomputation : 1" in t.to_moreh_line()
    assert ParallelConfig.from_moreh_line(t.to_moreh_line()) == t


@pytest.mark.parametrize(
    "line, words",
    [
        ("", "empty line"),
        ("num_stages : 2, num_micro_batches : 4", "'batch_per_device' missing"),
        ("num_stages : two, num_micro_batches : 4, batch_per_device : 1", "is not an integer"),
        ("num_stages 2, num_micro_batches : 4, batch_per_device : 1", "malformed item"),
        ("num_stages : 2, num_micro_batches : 4, batch_per_device : 1, recomputation : 2", "is not 0 or 1"),
        ("num_stages : 2, num_micro_batches : 4, batch_per_device : 1, distribute_param : yes", "true or false"),
        ("num_stages : 2, num_micro_batches : 4, batch_per_device : 1, colour : red", "unknown item"),
        ("num_stages : 2, num_stages : 3, num_micro_batches : 4, batch_per_device : 1", "given twice"),
        ("num_stages : 0, num_micro_batches : 4, batch_per_device : 1", "num_stages=0"),
    ],
)
def test_malformed_lines(line, words):
    with pytest.raises(ValueError, match=words):
        ParallelConfig.from_moreh_line(line)


def test_dict_round_trip_is_json():
    c = cfg(num_stages=2, num_micro_batches=4, schedule="Interleaved1F1B", stages_per_rank=2, boundaries=(2, 4, 6))
    d = json.loads(json.dumps(c.to_dict()))
    assert d["boundaries"] == [2, 4, 6] and d["mixed_precision"] is True
    assert ParallelConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="unknown field"):
        ParallelConfig.from_dict({**d, "pp": 2})


@pytest.mark.parametrize(
    "kw, exc",
    [
        ({"num_stages": 0}, ValueError),
        ({"num_stages": 1.0}, TypeError),
        ({"batch_per_device": True}, TypeError),
        ({"recomputation": 1}, TypeError),
        ({"schedule": "gpipe"}, ValueError),
        ({"boundaries": (1.5,)}, TypeError),
    ],
)
def test_field_types(kw, exc):
    with pytest.raises(exc):
        cfg(**kw)


@pytest.mark.parametrize(
    "kw, world, batch, blocks, message",
    [
        ({"num_stages": 2, "num_micro_batches": 4}, 4, 12, None, r"num_stages\(2\) \* dp\(3\) \* tp\(1\) != world_size\(4\)"),
        ({"num_stages": 3}, 4, None, None, r"world_size\(4\) is not a multiple of num_stages\(3\) \* tp\(1\) = 3"),
        ({"num_micro_batches": 3}, 2, 8, None, r"global_batch\(8\) is not a multiple of num_micro_batches\(3\)"),
        ({"num_stages": 4, "num_micro_batches": 2}, 4, None, None, r"'1F1B' needs num_micro_batches\(2\) >= num_stages\(4\)"),
        ({"num_stages": 2, "schedule": "Interleaved1F1B"}, 2, None, None, "stages_per_rank >= 2"),
        ({"num_stages": 2, "num_micro_batches": 5, "schedule": "Interleaved1F1B", "stages_per_rank": 2}, 2, None, None, "multiple of its rounds"),
        ({"stages_per_rank": 2}, 2, None, None, "needs schedule='Interleaved1F1B'"),
        ({"distribute_low_prec_param": True}, 2, None, None, "needs distribute_param=True"),
        ({"distribute_param": True}, 1, None, None, r"dp > 1.*dp\(1\)"),
        ({"num_stages": 4, "num_micro_batches": 4}, 4, None, 3, r"4 pipeline stages > num_blocks\(3\)"),
        ({"num_stages": 2, "num_micro_batches": 2, "boundaries": (1, 2)}, 2, None, None, "has 2 entries; 2 stages need 1"),
        ({"num_stages": 3, "num_micro_batches": 3, "boundaries": (2, 2)}, 3, None, None, "strictly increasing"),
        ({"num_stages": 2, "num_micro_batches": 2, "boundaries": (5,)}, 2, None, 5, r"block 5 >= num_blocks\(5\)"),
        ({}, 0, None, None, "world_size=0"),
    ],
)
def test_validate_messages_show_the_arithmetic(kw, world, batch, blocks, message):
    with pytest.raises(ValueError, match=message):
        cfg(**kw).validate(world, global_batch=batch, num_blocks=blocks)


def test_valid_configs():
    cfg(num_stages=2, num_micro_batches=5, schedule="GPipe").validate(2)
    cfg(num_stages=2, num_micro_batches=4, schedule="Interleaved1F1B", stages_per_rank=2).validate(4, 8, 4)
    cfg(num_stages=2, num_micro_batches=2, boundaries=(3,)).validate(2, 2, 5)
    cfg(distribute_param=True, distribute_low_prec_param=True, mixed_precision=False).validate(4, 4)
    # one stage: the schedule is ignored
    cfg(num_micro_batches=1, schedule="GPipe").validate(1, 1)


def test_replace_and_balanced_boundaries():
    c = cfg(num_stages=2, num_micro_batches=2)
    assert c.replace(num_micro_batches=4).num_micro_batches == 4
    assert balanced_boundaries(10, 4) == (3, 6, 8)
    assert balanced_boundaries(4, 4) == (1, 2, 3)
    assert balanced_boundaries(5, 1) == ()
    with pytest.raises(ValueError):
        balanced_boundaries(2, 3)
