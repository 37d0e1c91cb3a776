# Tests for moreh_ap.planner: candidates, partition, memory and cost models, plan() with its log lines and dumps.
import re

import pytest
import torch

from moreh_ap.config import ParallelConfig
from moreh_ap.errors import NoFeasibleConfigError
from moreh_ap.graph import trace
from moreh_ap.option import APOptions
from moreh_ap.planner import Cluster, enumerate_candidates, plan
from moreh_ap.planner import cost, memory
from moreh_ap.planner.partition import linear_partition
from moreh_ap.planner.planning import DETAILED_DUMP, SELECTED_DUMP
from tests.helpers.models import TinyGPT, tiny_gpt2

pytestmark = pytest.mark.timeout(60)
GIB = 1024**3


@pytest.fixture(scope="module")
def gpt_graph():
    idx = torch.randint(0, 128, (8, 64))
    return trace(TinyGPT(d=64, layers=8, heads=4, seq=64), (idx,), {"labels": idx})


def cluster(mem=80 * GIB, nodes=1, dpn=4):
    return Cluster.preset("h100-80gb", nodes=nodes, devices_per_node=dpn).with_(device_memory=mem)


# ----------------------------------------------------------------- candidates
def test_candidates_all_valid_and_cover_the_space():
    cands = enumerate_candidates(world_size=4, global_batch=8, num_blocks=40)
    assert len(cands) == len(set(cands)) >= 30
    for c in cands:
        c.validate(4, 8, 40)
    assert {c.num_stages for c in cands} == {1, 2, 4}
    assert {c.schedule for c in cands if c.num_stages > 1} == {"GPipe", "1F1B", "Interleaved1F1B"}
    assert any(c.distribute_low_prec_param for c in cands) and any(c.recomputation for c in cands)
    assert not any(c.distribute_param for c in cands if c.dp(4) == 1)


@pytest.mark.parametrize(
    "opts, check",
    [
        (dict(num_stages=2), lambda c: c.num_stages <= 2),
        (dict(pipeline_parallel=False), lambda c: c.num_stages == 1),
        (dict(num_micro_batches=2), lambda c: c.num_micro_batches == 2),
        (dict(activation_recomputation=True), lambda c: c.recomputation),
        (dict(distribute_parameter=False), lambda c: not c.distribute_param),
        (dict(distribute_parameter=True), lambda c: c.distribute_param),
        (dict(mixed_precision=False), lambda c: not c.mixed_precision),
    ],
)
def test_candidates_honour_options(opts, check):
    cands = enumerate_candidates(world_size=8, global_batch=16, num_blocks=8, options=APOptions(**opts))
    assert cands and all(check(c) for c in cands)


def test_candidates_small_models_and_batches():
    assert {c.num_stages for c in enumerate_candidates(world_size=4, global_batch=4, num_blocks=0)} == {1}
    assert max(c.num_stages for c in enumerate_candidates(world_size=8, global_batch=8, num_blocks=2)) == 2
    assert enumerate_candidates(world_size=4, global_batch=3, num_blocks=2) == []  # 3 samples over dp 2 or 4: none


def test_linear_partition_balances():
    assert linear_partition([1.0] * 10, 4) == (3, 6, 8)
    assert linear_partition([5, 1, 1, 1, 1, 1, 1, 5], 3) == (2, 7)
    with pytest.raises(ValueError):
        linear_partition([1.0, 1.0], 3)


# --------------------------------------------------------------------- memory
def _mem(graph, world=4, **kw):
    base = dict(num_stages=1, num_micro_batches=1, batch_per_device=2)
    base.update(kw)
    return memory.estimate(graph, ParallelConfig(**base), world_size=world)


def test_memory_breakdown_sums_and_modes(gpt_graph):
    plain = _mem(gpt_graph)
    zero2 = _mem(gpt_graph, distribute_param=True)
    zero3 = _mem(gpt_graph, distribute_param=True, distribute_low_prec_param=True)
    for m in (plain, zero2, zero3):
        d = m.to_dict()
        assert d["total"] == sum(d[k] for k in ("params", "grads", "optimizer", "activations", "transient"))
    assert zero2.optimizer == pytest.approx(plain.optimizer / 4, rel=0.01)
    assert zero3.params < zero2.params < plain.params * 1.01
    n = gpt_graph.total_params
    assert plain.optimizer == 2 * 4 * n  # AdamW: 2 fp32 states
    # fp32 master, + autocast's bf16 copies of the matmul weights (cached from forward, saved until backward) when
    # the peak is in backward
    matmul_weights = sum(m.weight.numel() for m in TinyGPT(d=64, layers=8, heads=4, seq=64).modules()
                         if isinstance(m, torch.nn.Linear))
    assert plain.params == (4 * n if plain.phase == "optimizer" else 4 * n + 2 * matmul_weights)
    busy = _mem(gpt_graph, batch_per_device=64)
    assert busy.phase == "backward" and busy.params == 4 * n + 2 * matmul_weights


def test_memory_optimizer_states(gpt_graph):
    n = gpt_graph.total_params
    cfg = ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=2)
    assert memory.estimate(gpt_graph, cfg, world_size=4, optimizer="sgd").optimizer == 4 * n
    sgd0 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert memory.estimate(gpt_graph, cfg, world_size=4, optimizer=sgd0).optimizer == 0
    assert memory.estimate(gpt_graph, cfg, world_size=4, optimizer="lamb").optimizer == 8 * n
    with pytest.raises(ValueError, match="adamw"):
        memory.estimate(gpt_graph, cfg, world_size=4, optimizer="adafactor")


def test_memory_activations_scale(gpt_graph):
    base = _mem(gpt_graph, world=1, batch_per_device=8)
    rec = _mem(gpt_graph, world=1, batch_per_device=8, recomputation=True)
    half = _mem(gpt_graph, world=1, num_micro_batches=2, batch_per_device=4)
    assert rec.activations < base.activations / 3
    assert half.activations < base.activations
    # the bytes saved in the precision a one-process bf16 run keeps (autocast), its weight copies counted as params
    prec = memory.activation_precision(gpt_graph, ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=8),
                                       device_type="cuda")
    assert prec == "autocast_cuda"
    full = sum(n.saved_bytes[prec] - n.saved_cast_bytes[prec] for n in gpt_graph.nodes)
    assert base.activations <= full and base.activations > 0.5 * full


def test_memory_pipeline_schedules(gpt_graph):
    def m(schedule, spr=1, nmb=8):
        cfg = ParallelConfig(num_stages=4, num_micro_batches=nmb, batch_per_device=1, schedule=schedule,
                             stages_per_rank=spr)
        return memory.estimate_stages(gpt_graph, cfg, world_size=4)

    gpipe, f1b = m("GPipe"), m("1F1B")
    assert gpipe[0].activations > f1b[0].activations  # GPipe keeps all 8 micro-batches
    assert f1b[0].activations > f1b[2].activations  # 1F1B: rank r keeps num_stages - r
    assert m("Interleaved1F1B", 2)[0].total > 0
    # frozen parameters: no grads, no optimizer state
    model = TinyGPT(d=64, layers=2)
    for p in model.parameters():
        p.requires_grad_(False)
    idx = torch.randint(0, 128, (2, 16))
    frozen = memory.estimate(trace(model, (idx,)), ParallelConfig(num_stages=1, num_micro_batches=1,
                                                                  batch_per_device=2), world_size=1)
    assert frozen.optimizer == 0


def test_memory_tied_parameters_counted_per_stage():
    model = tiny_gpt2(4)
    idx = torch.randint(0, 100, (4, 32))
    g = trace(model, (idx,), {"labels": idx})
    tied = g.tied[0].numel
    one = memory.estimate(g, ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=4), world_size=1)
    two = memory.estimate_stages(g, ParallelConfig(num_stages=2, num_micro_batches=2, batch_per_device=2),
                                 world_size=2)
    n = sum(p.numel() for p in model.parameters())
    assert one.optimizer == 8 * n
    assert sum(s.optimizer for s in two) == 8 * (n + tied)  # the tied weight lives on both stages


# ----------------------------------------------------------------------- cost
def test_cost_breakdown(gpt_graph):
    c = cluster(dpn=8)
    cfg1 = ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=1)
    t1 = cost.estimate(gpt_graph, cfg1, c)
    assert t1.bubble == 0 and t1.p2p == 0 and t1.dp_comm > 0 and t1.compute > 0
    assert t1.total == pytest.approx(sum(v for k, v in t1.to_dict().items() if k != "total"))
    zero3 = cost.estimate(gpt_graph, cfg1.replace(distribute_param=True, distribute_low_prec_param=True), c)
    assert zero3.dp_comm > t1.dp_comm
    rec = cost.estimate(gpt_graph, cfg1.replace(recomputation=True), c)
    assert rec.compute > t1.compute
    pipe = cost.estimate(gpt_graph, ParallelConfig(num_stages=4, num_micro_batches=4, batch_per_device=1), c)
    assert pipe.bubble > 0 and pipe.p2p > 0
    inter = cost.estimate(gpt_graph, cfg1, cluster(nodes=8, dpn=1))
    assert inter.dp_comm > t1.dp_comm  # the same all-reduce over the slower inter-node links


# ----------------------------------------------------------------------- plan
def _plan(graph, **kw):
    kw.setdefault("cluster", cluster())
    return plan(graph, **kw)


LOG_ORDER = [
    r"The number of candidates is (\d+)\.",
    r"Parallel Graph Compile start\.\.\.",
    r"Elapsed Time to compile all candidates = (\d+) \[ms\]",
    r"Parallel Graph Compile finished\.",
    r"The number of possible candidates is (\d+)\.",
    r"SelectBestGraphFromCandidates start\.\.\.",
    r"Elapsed Time to compute cost for survived candidates = (\d+) \[ms\]",
    r"SelectBestGraphFromCandidates finished\.",
    r"Configuration for parallelism is selected\.",
    r"num_stages : \d+, num_micro_batches : \d+, batch_per_device : \d+, No TP, recomputation : [01], "
    r"distribute_param : (true|false), distribute_low_prec_param : (true|false)",
    r"train: true",
]


def test_plan_log_lines_and_dump(gpt_graph, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = plan(TinyGPT(d=64, layers=8, heads=4, seq=64), (torch.randint(0, 128, (8, 64)),),
             cluster=cluster(), dump=True)
    lines = [l for l in capsys.readouterr().err.splitlines() if "[info]" in l]
    assert all(re.match(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] \[info\] ", l) for l in lines)
    msgs = [l.split("] ", 2)[2] for l in lines]
    assert len(msgs) == len(LOG_ORDER)
    for msg, pat in zip(msgs, LOG_ORDER):
        assert re.fullmatch(pat, msg), (msg, pat)
    assert int(re.fullmatch(LOG_ORDER[0], msgs[0]).group(1)) == len(p.candidates)
    assert int(re.fullmatch(LOG_ORDER[4], msgs[4]).group(1)) == sum(c.feasible for c in p.candidates)
    assert msgs[9] == p.config.to_moreh_line()
    line = (tmp_path / SELECTED_DUMP).read_text().strip()
    back = ParallelConfig.from_moreh_line(line)
    for f in ("num_stages", "num_micro_batches", "batch_per_device", "tp", "recomputation", "distribute_param",
              "distribute_low_prec_param"):
        assert getattr(back, f) == getattr(p.config, f)
    assert p.planning_ms > 0 and "selected" in p.summary()
    p.config.validate(4, 8, 8)


def test_plan_picks_fastest_feasible(gpt_graph):
    p = _plan(gpt_graph)
    feasible = [c for c in p.candidates if c.feasible]
    assert p.selected.step_time == min(c.step_time for c in feasible)
    assert all(c.step_time is None and c.reason for c in p.candidates if not c.feasible)
    assert all(set(c.memory.to_dict()) >= {"params", "grads", "optimizer", "activations", "transient", "total"}
               for c in p.candidates)
    if p.config.num_stages > 1:
        assert p.config.boundaries is not None


def test_plan_rejects_for_memory_and_explains(gpt_graph):
    tight = _plan(gpt_graph, cluster=cluster(mem=int(gpt_graph.total_params * 12)))
    plain = [c for c in tight.candidates if c.config.num_stages == 1 and not c.config.distribute_param
             and not c.config.recomputation]
    assert plain and not any(c.feasible for c in plain) and "out of memory" in plain[0].reason
    with pytest.raises(NoFeasibleConfigError) as err:
        _plan(gpt_graph, cluster=cluster(mem=1024))
    msg = str(err.value)
    assert "requests" in msg and "1,024" in msg and "more devices" in msg and "smaller global batch" in msg
    with pytest.raises(NoFeasibleConfigError, match="allow activation_recomputation"):
        _plan(gpt_graph, cluster=cluster(mem=1024), options={"activation_recomputation": False})


def test_plan_options_and_bad_arguments(gpt_graph):
    p = _plan(gpt_graph, options={"num_stages": 2, "distribute_parameter": False})
    assert all(c.config.num_stages <= 2 and not c.config.distribute_param for c in p.candidates)
    with pytest.raises(TypeError, match="accepted keywords"):
        _plan(gpt_graph, options={"stages": 2})
    with pytest.raises(TypeError, match="options"):
        _plan(gpt_graph, options=3)
    with pytest.raises(ValueError, match="optimizer"):
        _plan(gpt_graph, optimizer="adafactor")
    with pytest.raises(TypeError, match="cluster"):
        plan(gpt_graph, cluster="h100")
    with pytest.raises(ValueError, match="multiple"):
        _plan(gpt_graph, cluster=Cluster.preset("h100-80gb", devices_per_node=3), options={"pipeline_parallel": False})


def test_detailed_log_levels(gpt_graph, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOREH_ADVANCED_PARALLELIZATION_DETAILED_LOG", "1")
    p = _plan(gpt_graph)
    err = capsys.readouterr().err
    assert "verdict" in err and err.count(" OOM") + err.count(" ok") + err.count(" selected") >= len(p.candidates)
    monkeypatch.setenv("MOREH_ADVANCED_PARALLELIZATION_DETAILED_LOG", "2")
    _plan(gpt_graph)
    assert "verdict" not in capsys.readouterr().err
    table = (tmp_path / DETAILED_DUMP).read_text()
    assert len(table.splitlines()) == len(p.candidates) + 1 and "selected" in table


def test_thread_pool_uses_env_workers(gpt_graph, monkeypatch):
    import moreh_ap.planner.planning as planning

    seen = []
    real = planning.ThreadPoolExecutor

    def spy(max_workers):
        seen.append(max_workers)
        return real(max_workers=max_workers)

    monkeypatch.setattr(planning, "ThreadPoolExecutor", spy)
    monkeypatch.setenv("MOREH_ADVANCED_PARALLELIZATION_MAX_PARALLEL_COMPILE_THREADS", "3")
    _plan(gpt_graph)
    assert seen and all(w == 3 for w in seen)


def test_plan_with_detected_cluster_and_injected_db(gpt_graph, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOREH_AP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MOREH_AP_NPROC", "2")
    from moreh_ap.planner import calibration as cal
    from moreh_ap.planner import calibration_db as cdb

    db = cdb.CalibrationDB(fingerprint=cal.fingerprint(Cluster.preset("cpu")), matmul={"bf16": [[64, 1e11]],
                           "fp32": [[64, 2e10]]}, source="injected")
    (tmp_path / cdb.FILENAME).write_text(__import__("json").dumps(db.to_dict()))
    p = plan(gpt_graph)
    assert "Got DBs from backend for auto config." in capsys.readouterr().err
    assert p.cluster.world_size == 2 and p.cluster.device_type == "cpu"
    assert p.cluster.calibration.matmul_flops("bf16") == 1e11
