# Tests for calibration at the model's own shapes: GEMMs at traced sizes, the live model's block/head/optimizer timed.
import copy
import json

import pytest
import torch

from moreh_ap import trace
from moreh_ap.config import ParallelConfig
from moreh_ap.planner import calibration_db as cdb
from moreh_ap.planner import cost
from moreh_ap.planner import shape_calibration as sc
from moreh_ap.planner import time_model as tm
from moreh_ap.planner.calib_items import Item, micro_batches
from moreh_ap.planner.cluster import Cluster
from moreh_ap.planner.gemm_bench import MAX_GEMMS, gemm_items, gemm_shapes
from tests.helpers.models import TinyGPT, tiny_llama

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

MATMUL = {"bf16": [[64.0, 1e9], [256.0, 4e9]], "fp32": [[64.0, 2e9], [256.0, 8e9]]}


def _cluster(source="measured"):
    c = Cluster.preset("cpu", devices_per_node=1)
    c.calibration = cdb.CalibrationDB(fingerprint={"device": "test", "world": 0}, matmul=copy.deepcopy(MATMUL),
                                      source=source)
    return c


def _gpt(batch=4, seq=16):
    torch.manual_seed(0)
    model = TinyGPT(d=32, layers=2, heads=2, seq=seq)
    idx = torch.randint(0, 128, (batch, seq))
    return model, (idx,), trace(model, (idx,))


def _cfg(nmb=1, bpd=4, **kw):
    return ParallelConfig(num_stages=1, num_micro_batches=nmb, batch_per_device=bpd, **kw)


def test_gemm_shapes_deduplicated_capped_at_micro_batch_one_and_traced_batch():
    _, _, g = _gpt(batch=4, seq=16)
    shapes = gemm_shapes(g, "fp32")
    assert len(shapes) == len(set(shapes)) <= MAX_GEMMS
    rows = {m for m, _, _ in shapes}
    assert rows == {16, 64}  # one sample of 16 tokens and the traced 4 x 16
    assert (64, 32, 96) in shapes  # the block's qkv projection at the traced batch


def test_too_big_gemm_is_timed_scaled_down_and_kept_at_its_own_shape():
    _, _, g = _gpt()
    db = _cluster().calibration
    db.matmul = {"fp32": [[64.0, 1e3]]}  # absurdly slow: every shape is over the item cap
    items = gemm_items(db, g, device=torch.device("cpu"), dtypes=("fp32", "bf16"), cap_s=1e-3)
    assert items and all(it.estimate() <= 1e-3 for it in items)  # estimated as the scaled-down call
    for it in items:
        it.store(it.run())
    assert set(db.model_gemm) == {"fp32"}  # no bf16 rate in the DB: no bf16 items
    assert {tuple(int(x) for x in r[:3]) for r in db.model_gemm["fp32"]} == set(gemm_shapes(g, "fp32"))
    assert all(r[3] > 0 for r in db.model_gemm["fp32"])


def test_budget_is_enforced_item_by_item():
    ran = []

    def item(name, est, essential=False):
        return Item(key=name, estimate=lambda: est, run=lambda: ran.append(name) or 0.01, store=lambda s: None,
                    essential=essential)

    items = [item("small", 0.01), item("over the per-item cap", 1.0), item("fits", 0.05), item("big", 0.2),
             item("smallest micro-batch", 0.3, essential=True), item("over what is left", 0.6, essential=True)]
    times, skipped = sc._measure(items, budget=1.0, device=torch.device("cpu"))
    # warm-up + one call of 0.2 s is over 25 % of 1 s; an essential item only needs to fit what is left
    assert ran == ["small", "fits", "smallest micro-batch"] and skipped == 3
    assert times[1] == times[3] == times[5] == -1.0 and times[0] == times[2] == times[4] == 0.01


def test_live_model_is_calibrated_within_budget_and_cached(tmp_path):
    model, args, g = _gpt()
    c = _cluster()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = sc.calibrate_model(c, g, model=model, args=args, optimizer=opt, cache_dir=tmp_path)
    db = c.calibration
    assert out["timed"] == out["total"] > 0 and out["skipped"] == 0
    block = g.blocks[0]
    for dtype in ("bf16", "fp32"):
        for rec in (False, True):
            pts = db.node_times[tm.node_time_key(block, dtype=dtype, recompute=rec)]
            assert [p[0] for p in pts] == [b / 4 for b in micro_batches(4)] == [0.25, 0.5, 1.0]
        # a family that cannot cut the model (generic) has no head stage of its own: formulas
        assert tm.node_time_key(g.post, dtype=dtype, recompute=False) not in db.node_times
    assert db.optimizer_step["adamw"] > 0 and db.model_gemm["fp32"] and db.model_gemm["bf16"]
    # cached per device fingerprint: read back, nothing left to time for the same model and shape
    cached = cdb.read_cache(tmp_path / cdb.FILENAME, db.fingerprint)
    assert cached.node_times == db.node_times and cached.optimizer_step == db.optimizer_step
    c.calibration = cached
    assert sc.calibrate_model(c, g, model=model, args=args, optimizer=opt, cache_dir=tmp_path)["total"] == 0
    # another shape (sequence length) is another key: timed again
    model2, args2, g2 = _gpt(seq=32)
    again = sc.calibrate_model(c, g2, model=model2, args=args2, optimizer=opt, cache_dir=tmp_path,
                               dtypes=("fp32",), recomputes=(False,))
    assert again["timed"] > 0
    assert tm.node_time_key(g2.blocks[0], dtype="fp32", recompute=False) in c.calibration.node_times
    assert cdb.read_cache(tmp_path / cdb.FILENAME, {"device": "other", "world": 0}) is None


def test_meta_model_gets_gemms_and_formulas_only(tmp_path):
    with torch.device("meta"):
        model = TinyGPT(d=32, layers=2, heads=2, seq=16)
    idx = torch.randint(0, 128, (4, 16))
    g = trace(model, (idx,))
    c = _cluster()
    sc.calibrate_model(c, g, model=model, args=(idx,), optimizer="adamw", cache_dir=tmp_path)
    db = c.calibration
    assert not db.node_times and not db.optimizer_step and db.model_gemm["fp32"]
    # a graph alone (no model) is the same
    c2 = _cluster()
    sc.calibrate_model(c2, g, model=g, cache_dir=tmp_path)
    assert not c2.calibration.node_times and c2.calibration.model_gemm
    # the GEMMs timed at the nodes' shapes replace the square-matmul rate in the formulas
    plain = cost.estimate(g, _cfg(mixed_precision=False), _cluster(), world_size=1)
    shaped = cost.estimate(g, _cfg(mixed_precision=False), c, world_size=1)
    assert shaped.compute != plain.compute and shaped.optimizer == plain.optimizer


def test_file_or_injected_db_is_not_extended(tmp_path):
    model, args, g = _gpt()
    c = _cluster(source="file:x.json")
    assert sc.calibrate_model(c, g, model=model, args=args, cache_dir=tmp_path)["total"] == 0
    assert not c.calibration.node_times and not (tmp_path / cdb.FILENAME).exists()


def test_cost_model_prefers_measured_block_head_and_optimizer():
    _, _, g = _gpt()
    c = _cluster()
    db = c.calibration
    key = tm.node_time_key(g.blocks[0], dtype="fp32", recompute=False)
    db.node_times[key] = [[0.25, 0.010], [1.0, 0.040]]
    base = cost.estimate(g, _cfg(mixed_precision=False), _cluster(), world_size=1)
    got = cost.estimate(g, _cfg(mixed_precision=False), c, world_size=1)
    others = base.compute - sum(cost._node_seconds(b, _cluster(), dtype="fp32", scale=1.0, recompute=False)
                                for b in g.blocks)
    assert got.compute == pytest.approx(others + 2 * 0.040)  # two blocks of the measured kind, at the traced batch
    # micro-batch 2 of 4: interpolated between the measured points; recomputation without its own point: x 4/3
    assert tm.measured_node_seconds(c, g.blocks[0], dtype="fp32", scale=0.5, recompute=False) == pytest.approx(0.020)
    rec = tm.measured_node_seconds(c, g.blocks[0], dtype="fp32", scale=1.0, recompute=True)
    assert rec == pytest.approx(0.040 * 4 / 3)
    assert tm.measured_node_seconds(c, g.blocks[0], dtype="bf16", scale=1.0, recompute=False) is None
    db.node_times[tm.node_time_key(g.post, dtype="fp32", recompute=False)] = [[1.0, 0.5]]
    with_head = cost.estimate(g, _cfg(mixed_precision=False, recomputation=True), c, world_size=1)
    assert with_head.compute > 0.5  # the head's measured time counts, recomputation or not
    db.optimizer_step["adamw"] = 1e-6
    assert cost.estimate(g, _cfg(mixed_precision=False), c, world_size=1).optimizer == pytest.approx(
        1e-6 * g.total_params)


def test_rng_and_user_module_untouched(tmp_path):
    model, args, g = _gpt()
    model.blocks[0].drop = torch.nn.Dropout(0.1)  # a module drawing random numbers in the calibration's forwards
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sc.calibrate_model(_cluster(), g, model=model, args=args, optimizer=opt, cache_dir=tmp_path)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not opt.state
    assert model.training and not model.blocks[0]._forward_pre_hooks


def test_hf_llama_block_with_rotary_and_mask_kwargs(tmp_path):
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 16))
    g = trace(model, (ids,), {"labels": ids})
    c = _cluster()
    out = sc.calibrate_model(c, g, model=model, args=(ids,), kwargs={"labels": ids}, cache_dir=tmp_path,
                             dtypes=("fp32",), recomputes=(False,))
    assert out["timed"] == out["total"]
    assert tm.node_time_key(g.blocks[0], dtype="fp32", recompute=False) in c.calibration.node_times
    assert tm.node_time_key(g.post, dtype="fp32", recompute=False) in c.calibration.node_times


def test_format_3_round_trip_and_format_2_still_read():
    db = _cluster().calibration
    db.node_times = {"block|x|fp32|rec0": [[0.5, 0.01]]}
    db.model_gemm = {"fp32": [[64.0, 32.0, 96.0, 1e-5]]}
    db.measure_s = 1.5
    d = json.loads(json.dumps(db.to_dict()))
    assert d["format"] == cdb.FORMAT == "moreh_ap.calibration/3"
    back = cdb.CalibrationDB.from_dict(d)
    assert back.node_times == db.node_times and back.model_gemm == db.model_gemm and back.measure_s == 1.5
    old = {"format": "moreh_ap.calibration/2", "fingerprint": {}, "matmul": MATMUL, "collectives": None,
           "block_efficiency": {}, "block_floor": {}}
    assert cdb.CalibrationDB.from_dict(old).node_times == {}
    with pytest.raises(ValueError, match="node_times"):
        cdb.CalibrationDB.from_dict({**d, "node_times": {"k": [[1.0, -2.0]]}})


def test_plan_calibrates_the_live_model(tmp_path, monkeypatch):
    from moreh_ap.planner.planning import plan

    monkeypatch.setenv("MOREH_AP_CACHE_DIR", str(tmp_path))
    model, args, _ = _gpt()
    p = plan(model, args, cluster=_cluster(), options={"mixed_precision": False})  # a DB measured here
    db = p.cluster.calibration
    assert db.node_times and all("|fp32|" in k for k in db.node_times)  # only the dtype the options allow
    assert p.selected.step_time > 0 and (tmp_path / cdb.FILENAME).exists()


def test_a_model_whose_parts_cannot_run_alone_falls_back_to_the_formulas(tmp_path, monkeypatch):
    from moreh_ap.planner import calib_items

    def fail(*a, **k):
        raise RuntimeError("the forward needs something the planner does not have")

    monkeypatch.setattr(calib_items, "capture_block_inputs", fail)
    model, args, g = _gpt()
    c = _cluster()
    out = sc.calibrate_model(c, g, model=model, args=args, optimizer="adamw", cache_dir=tmp_path,
                             dtypes=("fp32",), recomputes=(False,))
    assert out["timed"] < out["total"] and not c.calibration.node_times  # blocks not timed, no error
    assert c.calibration.model_gemm["fp32"] and c.calibration.optimizer_step["adamw"] > 0


def test_a_long_call_is_repeated_less():
    import time

    from moreh_ap.planner.block_bench import median_seconds

    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.02)

    median_seconds(fn, torch.device("cpu"), repeats=3)
    assert len(calls) == 4  # a warm-up and 3 timed calls
    calls.clear()
    assert median_seconds(fn, torch.device("cpu"), repeats=3, max_s=0.001) > 0
    assert len(calls) == 2  # a warm-up and one timed call: the item's share is spent


def test_base_measurement_leaves_out_what_does_not_fit_its_budget():
    import time

    from moreh_ap.planner import microbench as mb

    called = []

    def slow_small(name):
        return lambda: called.append(name) or time.sleep(0.001)

    def never(name):
        return lambda: pytest.fail(f"{name} was timed though estimated over the budget")

    fns = {("mm", "fp32", 8): slow_small("mm8"), ("mm", "fp32", 1024): never("mm1024"),
           ("tiny", "fp32"): slow_small("tiny"), ("ref", "fp32"): never("ref")}
    kept, reps = mb._within_budget(fns, torch.device("cpu"), repeats=5, budget_s=1.0, shape=(256, 4, 128, 1))
    assert set(kept) == {("mm", "fp32", 8), ("tiny", "fp32")} and 1 <= reps <= 5
    table = mb._table({("mm", "fp32", 8): 0.001}, (8, 1024))
    assert table == {"fp32": [[8.0, 2.0 * 8**3 / 0.001]]}  # the side not timed is left out
    eff, floor = mb._block_numbers({("tiny", "fp32"): 0.002}, table, (256, 4, 128, 1))
    assert eff == {} and floor == {"fp32": 0.002}  # no reference block: efficiency 1.0, the tiny block's floor


def test_beyond_the_largest_measured_micro_batch_the_formula_gives_the_trend():
    _, _, g = _gpt()
    c = _cluster()
    db = c.calibration
    block = g.blocks[0]
    db.node_times[tm.node_time_key(block, dtype="fp32", recompute=False)] = [[0.25, 0.010]]
    ratio = (tm.formula_seconds(db, block, dtype="fp32", scale=1.0, passes=3)
             / tm.formula_seconds(db, block, dtype="fp32", scale=0.25, passes=3))
    got = tm.measured_node_seconds(c, block, dtype="fp32", scale=1.0, recompute=False)
    assert got == pytest.approx(0.010 * ratio) and ratio != pytest.approx(4.0)  # the rate changes with the size
    assert tm.measured_node_seconds(c, block, dtype="fp32", scale=0.25, recompute=False) == pytest.approx(0.010)
