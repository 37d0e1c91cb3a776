# Tests for the cost model's use of the calibration DB: GEMM-size rates, block efficiency, FSDP collectives per unit.
import pytest
import torch

from moreh_ap import trace
from moreh_ap.config import ParallelConfig
from moreh_ap.planner import calibration_db as cdb
from moreh_ap.planner import microbench as mb
from moreh_ap.planner import time_model as tm
from moreh_ap.planner import cost
from moreh_ap.planner.cluster import Cluster
from tests.helpers.models import TinyGPT

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def graph():
    idx = torch.randint(0, 128, (8, 64))
    return trace(TinyGPT(d=64, layers=4, heads=4, seq=64), (idx,), {"labels": idx})


def _cpu(db=None, dpn=2):
    c = Cluster.preset("cpu", devices_per_node=dpn)
    c.calibration = db
    return c


def _db(**kw):
    kw.setdefault("matmul", {"bf16": [[64.0, 1e10], [256.0, 4e10]], "fp32": [[64.0, 5e9], [256.0, 2e10]]})
    return cdb.CalibrationDB(fingerprint={}, source="injected", **kw)


def test_matmul_rate_interpolated_by_size():
    db = _db()
    assert db.matmul_flops("bf16") == 4e10  # no size: the largest measured side
    assert db.matmul_flops("bf16", 160.0) == pytest.approx(2.5e10)
    assert db.matmul_flops("bf16", 16.0) == 1e10 and db.matmul_flops("bf16", 4096.0) == 4e10
    assert db.matmul_flops("int8") is None
    # (rows * largest weight) ** (1/3): a 128-row micro-batch through 64x256 weights
    assert tm.gemm_size(2 * 128 * 20000, 20000, 64 * 256) == pytest.approx((128 * 64 * 256) ** (1 / 3))
    assert tm.gemm_size(0, 10, 10) is None and tm.gemm_size(10, 0, 10) is None


def test_small_micro_batches_run_slower_gemms(graph):
    """Same samples per step: 8 micro-batches of 1 take longer than 1 of 8 when small GEMMs are slower."""
    c = _cpu(_db(), dpn=1)
    one = cost.estimate(graph, ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=8), c, world_size=1)
    eight = cost.estimate(graph, ParallelConfig(num_stages=1, num_micro_batches=8, batch_per_device=1), c,
                          world_size=1)
    assert eight.compute > 1.2 * one.compute
    flat = _cpu(_db(matmul={"bf16": [[64.0, 4e10], [256.0, 4e10]]}), dpn=1)  # size-independent rate: equal
    a = cost.estimate(graph, ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=8), flat, world_size=1)
    b = cost.estimate(graph, ParallelConfig(num_stages=1, num_micro_batches=8, batch_per_device=1), flat, world_size=1)
    assert a.compute == pytest.approx(b.compute)


def test_block_efficiency_scales_block_time_only(graph):
    cfg = ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=8)
    flat = {"bf16": [[64.0, 4e10]]}
    full = cost.estimate(graph, cfg, _cpu(_db(matmul=flat), dpn=1), world_size=1).compute
    half = cost.estimate(graph, cfg, _cpu(_db(matmul=flat, block_efficiency={"bf16": 0.5}), dpn=1),
                         world_size=1).compute
    blocks = sum(3 * n.fwd_flops for n in graph.blocks) / 4e10
    assert half - full == pytest.approx(blocks, rel=1e-6)  # blocks take twice as long, the head does not change
    assert tm.block_efficiency(_cpu(None), "bf16") == 1.0


def test_fsdp_without_pipeline_collectives_every_micro_batch(graph):
    """pp = 1: parameters gathered (twice for ZeRO-3) and gradients reduce-scattered every micro-batch."""
    db = _db(collective_world=2, collectives={"all_gather": [[1e3, 1e-3], [1e7, 2e-3]],
                                              "reduce_scatter": [[1e3, 5e-3], [1e7, 6e-3]],
                                              "all_reduce": [[1e3, 1e-3], [1e7, 2e-3]]})
    c = _cpu(db)
    z2 = ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=4, distribute_param=True)
    t1 = cost.estimate(graph, z2, c).dp_comm
    t4 = cost.estimate(graph, z2.replace(num_micro_batches=4, batch_per_device=1), c).dp_comm
    # the runtime's units (moreh_ap.fsdp_units.is_own_unit): each block; the embedding and the head (untied, each
    # over 1/8 of a block) are units of their own; nothing is left with the root
    units = [n.num_params for n in graph.blocks] + [graph.pre.num_params, graph.post.num_params]
    ag = sum(tm.collective_time(c, "all_gather", 2 * u, group=2, inter_node=False) for u in units)
    assert t4 == pytest.approx(4 * t1)  # 4 micro-batches: 4 x (all-gathers + reduce-scatters)
    assert t1 > ag  # the reduce-scatters are there
    z3 = z2.replace(distribute_low_prec_param=True)
    assert cost.estimate(graph, z3, c).dp_comm - t1 == pytest.approx(ag)
    assert len(units) == 6 and ag > 6e-3  # one collective per fully_shard unit, each paying its latency


def test_measured_block_efficiency_is_a_fraction():
    m = mb.measure_matmul(torch.device("cpu"), sizes=(32, 64), repeats=2)
    eff, floor = mb.measure_block(torch.device("cpu"), m, shape=(32, 2, 16, 1), tiny_shape=(8, 2, 4, 1), repeats=2)
    assert set(eff) == {"bf16", "fp32"} and all(0 < v <= 1 for v in eff.values())
    assert set(floor) == {"bf16", "fp32"} and all(v > 0 for v in floor.values())
    table, eff, floor = mb.measure_compute(torch.device("cpu"), sizes=(32, 64), shape=(32, 2, 16, 1),
                                            tiny_shape=(8, 2, 4, 1), repeats=2)  # what load_or_measure runs
    assert [p[0] for p in table["bf16"]] == [32.0, 64.0] and all(p[1] > 0 for p in table["fp32"])
    assert all(0 < v <= 1 for v in eff.values()) and all(v > 0 for v in floor.values())


def test_block_floor_is_paid_per_block_and_micro_batch(graph):
    flat = {"bf16": [[64.0, 4e10]]}
    db = _db(matmul=flat, block_floor={"bf16": 1e-3})
    one = ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=8)
    eight = one.replace(num_micro_batches=8, batch_per_device=1)
    base = cost.estimate(graph, eight, _cpu(_db(matmul=flat), dpn=1), world_size=1).compute
    assert cost.estimate(graph, eight, _cpu(db, dpn=1), world_size=1).compute - base == pytest.approx(8 * 4 * 1e-3)
    rec = cost.estimate(graph, one.replace(recomputation=True), _cpu(db, dpn=1), world_size=1).compute
    rec0 = cost.estimate(graph, one.replace(recomputation=True), _cpu(_db(matmul=flat), dpn=1), world_size=1).compute
    assert rec - rec0 == pytest.approx(4 * 1e-3 * 4 / 3)  # a recomputed forward pays a third more
    bad = dict(db.to_dict(), block_floor={"bf16": -1})
    with pytest.raises(ValueError, match="block_floor"):
        cdb.CalibrationDB.from_dict(bad)


def test_small_collectives_pay_log_latency_not_ring():
    c = Cluster.preset("h100-80gb", nodes=1, devices_per_node=8)
    lat = c.link_latency
    small = tm.collective_time(c, "all_reduce", 8, group=8, inter_node=False)
    assert small == pytest.approx(3 * lat, rel=0.01)  # recursive doubling: log2(8) steps, not 2 * 7
    assert tm.collective_time(c, "all_gather", 8, group=8, inter_node=False) == pytest.approx(3 * lat, rel=0.01)
    assert tm.collective_time(c, "all_gather", 8, group=3, inter_node=False) == pytest.approx(2 * lat, rel=0.01)
    big = 10**10  # bandwidth-bound: the ring's 2 (n-1)/n bytes per rank
    bw = c.intra_node_bandwidth * c.comm_efficiency
    assert tm.collective_time(c, "all_reduce", big, group=8, inter_node=False) == pytest.approx(
        2 * 7 / 8 * big / bw + 14 * lat)


def test_tiny_model_on_one_node_prefers_data_parallel():
    """A ~200k-parameter model on 8 H100 of one node: no pipeline (the issue-3 note picked 4 stages x 1)."""
    from moreh_ap.planner.planning import plan_graph

    idx = torch.randint(0, 128, (8, 32))
    g = trace(TinyGPT(d=64, layers=4, heads=4, seq=32), (idx,), {"labels": idx})
    p = plan_graph(g, cluster=Cluster.preset("h100-80gb", nodes=1, devices_per_node=8))
    assert p.config.num_stages == 1, p.summary()


def test_noisy_collective_table_is_made_monotone():
    """A small size measured slower than a larger one (a busy machine) is clamped to the larger one's time."""
    db = _db(collective_world=2, collectives={"all_reduce": [[65536.0, 3.6e-3], [2**20, 1.5e-3], [2**22, 4.7e-3]]})
    c = _cpu(db)
    assert tm.collective_time(c, "all_reduce", 65536, group=2, inter_node=False) == pytest.approx(1.5e-3)
    assert tm.collective_time(c, "all_reduce", 2**21, group=2, inter_node=False) == pytest.approx(
        1.5e-3 + (4.7e-3 - 1.5e-3) / 3)


def _gemm_db(**kw):
    """A DB with a GEMM table (as a hardware profile gives): 1e12 FLOP/s at every shape."""
    rows = [[64.0, 64.0, 64.0, 2 * 64**3 / 1e12], [512.0, 256.0, 1024.0, 2 * 512 * 256 * 1024 / 1e12]]
    return _db(gemm={"bf16": rows, "fp32": rows}, mem_bandwidth=1e11, **kw)


def test_census_path_gemms_bytes_recompute_and_floor(graph):
    """With a GEMM table each node is its GEMMs at the table's rate + its moved bytes over the bandwidth; a
    recomputed block adds exactly one forward; the block floor adds on the CPU and is a minimum on CUDA."""
    cfg = ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=8, mixed_precision=False)
    block = graph.blocks[0]
    c = _cpu(_gemm_db(), dpn=1)
    gemm_flops = sum(2 * m * k * n * b * cnt for m, k, n, b, cnt in block.gemms["full"])
    other = block.fwd_flops - gemm_flops
    fwd = (gemm_flops + max(other, 0)) / 1e12 + block.moved_bytes["full"] / 1e11
    assert cost._census_seconds(block, c, dtype="fp32", prec="full", scale=1.0, recompute=False) == \
        pytest.approx(3 * fwd)
    assert cost._census_seconds(block, c, dtype="fp32", prec="full", scale=1.0, recompute=True) == \
        pytest.approx(4 * fwd)
    floor = {"fp32": 1.0}
    on_cpu = cost._census_seconds(block, _cpu(_gemm_db(block_floor=floor), dpn=1), dtype="fp32", prec="full",
                                  scale=1.0, recompute=False)
    assert on_cpu == pytest.approx(1.0 + 3 * fwd)
    gpu = Cluster.preset("h200").with_(calibration=_gemm_db(block_floor=floor))
    assert cost._census_seconds(block, gpu, dtype="fp32", prec="full", scale=1.0, recompute=False) == 1.0
    # micro-batches: each after the first accumulates the gradients (fp32: 12 bytes per parameter)
    two = ParallelConfig(num_stages=1, num_micro_batches=2, batch_per_device=4, mixed_precision=False)
    t1, t2 = cost.estimate(graph, cfg, c, world_size=1), cost.estimate(graph, two, c, world_size=1)
    trainable = graph.params_of([n.name for n in graph.nodes], trainable_only=True)
    assert t2.compute - t1.compute == pytest.approx(trainable * 12 / 1e11) and t2.optimizer == t1.optimizer
    # without a GEMM table the square-matmul path is unchanged
    assert cost.estimate(graph, cfg, _cpu(_db(), dpn=1), world_size=1).compute != t1.compute


def test_census_path_costs_attention_at_the_flash_rates(graph):
    """With the device's flash attention rates the traced attention FLOPs leave the GEMM-rate term and take the
    kernel's: forward FLOPs / forward rate, 2.5 x them / backward rate; without rates (fp32 here) they stay at the
    GEMM rate."""
    from moreh_ap.graph.op_census import ATTN_CAUSAL, attention_flops

    block = graph.blocks[0]
    calls = block.attention["mixed"]
    assert calls and all(c[5] == ATTN_CAUSAL for c in calls)  # TinyGPT calls sdpa with is_causal=True
    gemm_flops = sum(2 * m * k * n * b * cnt for m, k, n, b, cnt in block.gemms["mixed"])
    assert block.fwd_flops - gemm_flops == pytest.approx(attention_flops(calls, as_run=False))
    plain = Cluster.preset("h200").with_(calibration=_gemm_db(), attention_flops={})
    rated = plain.with_(attention_flops={"bf16": (2e11, 1e11)})
    kw = dict(prec="mixed", scale=1.0, recompute=False)
    without = cost._census_seconds(block, plain, dtype="bf16", **kw)
    with_rates = cost._census_seconds(block, rated, dtype="bf16", **kw)
    attn = attention_flops(calls, as_run=True)
    assert with_rates - without == pytest.approx(attn / 2e11 + 2.5 * attn / 1e11 - 3 * attn / 1e12)
    assert tm.attention_seconds(rated, "bf16", calls, scale=0.5) == pytest.approx((attn / 4e11, 2.5 * attn / 2e11))
    assert tm.attention_seconds(rated, "fp32", calls, scale=1.0) is None
    assert cost._census_seconds(block, rated, dtype="fp32", prec="full", scale=1.0, recompute=False) == \
        cost._census_seconds(block, plain, dtype="fp32", prec="full", scale=1.0, recompute=False)
    # a square mask (HF's causal mask on a fake trace) is counted in full in fwd_flops; without rates its
    # attention is the causal kernel's FLOPs at the GEMM rate, as the is_causal call's
    import dataclasses

    from moreh_ap.graph.op_census import ATTN_SQUARE_MASK

    masked = dataclasses.replace(block, attention={"mixed": tuple((*c[:5], ATTN_SQUARE_MASK, c[6]) for c in calls)},
                                 fwd_flops=int(gemm_flops + 2 * attn))
    assert cost._census_seconds(masked, plain, dtype="bf16", **kw) == pytest.approx(without)
    assert cost._census_seconds(masked, rated, dtype="bf16", **kw) == pytest.approx(with_rates)
    assert Cluster.preset("h100-80gb").attention_flops == Cluster.preset("h200").attention_flops
    assert Cluster.preset("cpu").attention_flops == {}
    with pytest.raises(ValueError, match="attention_flops"):
        plain.with_(attention_flops={"bf16": (1e12, 0.0)})
