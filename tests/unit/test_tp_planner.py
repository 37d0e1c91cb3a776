# Tests of tensor parallelism in the planner: facts, degrees, one TP rank's graph, memory / time, the keyword.
import json

import pytest
import torch

from moreh_ap.ap_options import APOptions
from moreh_ap.cli import main
from moreh_ap.config import ParallelConfig
from moreh_ap.errors import NoFeasibleConfigError
from moreh_ap.graph import trace
from moreh_ap.planner import Cluster, cost, enumerate_candidates, memory, plan, plan_graph
from moreh_ap.planner.tp import local_graph, tp_degrees, tp_facts
from tests.helpers.models import TinyGPT, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.timeout(120)
GIB = 1024**3


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_gpt2(layers=4)
    ids = torch.randint(0, 100, (8, 32))
    return model, trace(model, (ids,), {"labels": ids})


def _meta_gpt2(n_embd=1024, n_layer=24, n_head=16, vocab=50304, seq=128):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=vocab, n_positions=seq,
                     use_cache=False, bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        return GPT2LMHeadModel(cfg)


# --------------------------------------------------------------------- facts and degrees
def test_facts_from_the_adapters_plan(gpt2):
    model, graph = gpt2
    f = tp_facts(model)
    assert f.divisible == {"attention heads": 4}
    block = model.transformer.h[0]
    split = sum(p.numel() for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
                for p in m.parameters())
    assert f.split_params["transformer.h.0"] == split
    assert f.split_params["transformer.wte"] == model.transformer.wte.weight.numel()
    assert "transformer.wpe" not in f.split_params  # position embeddings stay whole
    assert "transformer.wte.weight" in f.split_fqns and "lm_head.weight" in f.split_fqns
    llama = tp_facts(tiny_llama(layers=2))
    assert llama.divisible == {"attention heads": 4, "key/value heads": 2}
    assert tp_facts(TinyGPT(d=32, layers=2, heads=2, seq=16)) is None  # no TP plan: never planned with TP
    assert tp_facts(graph) is None


def test_degrees_divide_heads_node_and_world(gpt2):
    f = tp_facts(gpt2[0])
    assert tp_degrees(f, devices_per_node=8, world_size=16) == [1, 2, 4]  # 4 heads
    assert tp_degrees(f, devices_per_node=2, world_size=16) == [1, 2]  # inside a node
    assert tp_degrees(f, devices_per_node=8, world_size=16, option=2) == [1, 2]
    assert tp_degrees(f, devices_per_node=8, world_size=16, option=1) == [1]
    assert tp_degrees(tp_facts(tiny_llama(layers=2)), devices_per_node=8, world_size=8) == [1, 2]  # 2 KV heads
    assert tp_degrees(None, devices_per_node=8, world_size=8) == [1]


def test_candidates_with_tp_are_valid():
    cands = enumerate_candidates(world_size=8, global_batch=16, num_blocks=8, tp_degrees=[1, 2, 4])
    assert {c.tp for c in cands} == {1, 2, 4}
    for c in cands:
        c.validate(8, 16, 8)
        assert c.num_stages * c.dp(8) * c.tp == 8
        assert c.batch_per_device * c.num_micro_batches * c.dp(8) == 16
    assert not [c for c in enumerate_candidates(world_size=8, global_batch=16, num_blocks=8) if c.tp > 1]


# --------------------------------------------------------------------- one TP rank's graph
def test_local_graph_splits_what_the_plan_splits(gpt2):
    model, graph = gpt2
    f = tp_facts(model)
    g2 = local_graph(graph, f, 2)
    assert local_graph(graph, f, 1) is graph
    for a, b in zip(graph.nodes, g2.nodes):
        split = sum(v for k, v in f.split_params.items() if any(k == q or k.startswith(q + ".") for q in a.fqns))
        assert b.num_params == a.num_params - split + split // 2
        # the vocabulary-parallel loss keeps the logits sharded; sequence parallelism the residual stream
        assert b.out_bytes == {k: v // 2 for k, v in a.out_bytes.items()}
        if a.kind == "block":
            assert b.fwd_flops == a.fwd_flops // 2
            for prec, v in a.saved_bytes.items():
                assert 0.5 * v < b.saved_bytes[prec] < v  # the projections' gathered inputs stay whole
    assert g2.tied[0].numel == graph.tied[0].numel // 2
    wpe = model.transformer.wpe.weight.numel()
    assert g2.total_params > graph.total_params // 2 and g2.total_params - wpe < (graph.total_params - wpe) // 2 + 2000


def test_memory_and_time_fall_with_tp_and_tp_comm_has_its_line(gpt2):
    model, graph = gpt2
    f = tp_facts(model)
    c = Cluster.preset("h100-80gb", nodes=1, devices_per_node=4)
    base = ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=8)
    mems, times = [], []
    for tp in (1, 2, 4):
        cfg = base.replace(tp=tp, batch_per_device=2 * tp)  # global batch 8 over dp = 4 / tp
        g = local_graph(graph, f, tp)
        m = memory.estimate(g, cfg, world_size=4, optimizer="adamw")
        mems.append(m)
        times.append(cost.estimate(g, cfg, c, world_size=4))
    # same samples per TP group member: params, optimizer state and activations shrink with tp
    assert mems[0].optimizer > mems[1].optimizer > mems[2].optimizer
    assert times[0].tp_comm == 0 and times[1].tp_comm > 0 and times[2].tp_comm > 0
    assert "tp_comm" in times[1].to_dict() and times[1].total == pytest.approx(sum(
        v for k, v in times[1].to_dict().items() if k != "total"))
    # tp 2 vs tp 1 at the same batch per device: half the block FLOPs, fewer activations
    one = base.replace(batch_per_device=2, num_micro_batches=1)
    t1 = cost.estimate(graph, one, c, world_size=4)
    t2 = cost.estimate(local_graph(graph, f, 2), one.replace(tp=2, batch_per_device=4), c, world_size=4)
    assert t2.compute < 2 * t1.compute  # twice the samples at half the width each


def test_tp_comm_counts_four_all_reduces_per_block(gpt2):
    from moreh_ap.planner.time_model import collective_time
    from moreh_ap.planner.tp import tp_comm_seconds

    model, graph = gpt2
    c = Cluster.preset("h100-80gb", nodes=1, devices_per_node=4)
    block = graph.blocks[0]
    ar = collective_time(c, "all_reduce", block.out_bytes["mixed"], group=2, inter_node=False)
    one = tp_comm_seconds([block], cluster=c, tp=2, prec="mixed", scale=1.0, recompute=False)
    assert one == pytest.approx(4 * ar)
    assert tp_comm_seconds([block], cluster=c, tp=2, prec="mixed", scale=1.0, recompute=True) == pytest.approx(6 * ar)
    assert tp_comm_seconds([block], cluster=c, tp=1, prec="mixed", scale=1.0, recompute=False) == 0


# --------------------------------------------------------------------- the search
def _gpt2_on_small_devices():
    """A meta GPT-2's graph (batch 8 x 128), its TP facts, and 8 A100s cut to 3 GiB: only splitting fits."""
    model = _meta_gpt2()
    ids = torch.empty(8, 128, dtype=torch.long, device="meta")
    c = Cluster.preset("a100-40gb", nodes=1, devices_per_node=8).with_(device_memory=3 * GIB)
    return trace(model, (ids,), {"labels": ids}), tp_facts(model), c


def test_a_model_that_fits_only_with_tp():
    graph, f, c = _gpt2_on_small_devices()
    opts = dict(pipeline_parallel=False, distribute_parameter=False)  # only TP can split the weights
    with pytest.raises(NoFeasibleConfigError, match="allow tensor_parallel"):
        plan_graph(graph, cluster=c, tp=f, options=dict(opts, tensor_parallel=1), use_measurements=False)
    p = plan_graph(graph, cluster=c, tp=f, options=opts, use_measurements=False)
    assert p.config.tp > 1 and p.selected.memory.total <= p.memory_cap
    assert f"TP : {p.config.tp}" in p.config.to_moreh_line()
    assert p.selected.time_breakdown["tp_comm"] > 0
    assert {x.config.tp for x in p.candidates} == {1, 2, 4, 8}
    capped = plan_graph(graph, cluster=c, tp=f, options=dict(opts, tensor_parallel=4), use_measurements=False)
    assert {x.config.tp for x in capped.candidates} == {1, 2, 4} and capped.config.tp == 4
    with pytest.raises(NoFeasibleConfigError):  # tp 2 halves the weights: still too much
        plan_graph(graph, cluster=c, tp=f, options=dict(opts, tensor_parallel=2), use_measurements=False)
    with pytest.raises(NoFeasibleConfigError):  # without the facts (a pre-traced graph alone) no TP
        plan_graph(graph, cluster=c, options=opts, use_measurements=False)


def test_plan_without_facts_or_with_tp_off_never_plans_tp(gpt2):
    model, graph = gpt2
    c = Cluster.preset("h100-80gb", nodes=1, devices_per_node=4)
    assert {x.config.tp for x in plan_graph(graph, cluster=c, use_measurements=False).candidates} == {1}
    p = plan(model, (torch.randint(0, 100, (8, 32)),), cluster=c, options={"tensor_parallel": 1})
    assert {x.config.tp for x in p.candidates} == {1}
    p = plan(model, (torch.randint(0, 100, (8, 32)),), cluster=c)  # a module: its facts are read
    assert {x.config.tp for x in p.candidates} == {1, 2, 4}


# --------------------------------------------------------------------- the keyword
def test_keyword_values_and_errors():
    assert APOptions().tensor_parallel == "auto"
    assert APOptions(tensor_parallel=4).tensor_parallel == 4
    assert APOptions(tensor_parallel=1).tensor_parallel == 1
    for bad in (True, False):
        with pytest.raises(TypeError, match=r"tensor_parallel=.*tensor_parallel=1"):
            APOptions(tensor_parallel=bad)
    for bad in (0, -2, 3, 6, "Auto", "8"):
        with pytest.raises(ValueError, match=r"tensor_parallel=.*power of two"):
            APOptions(tensor_parallel=bad)
    with pytest.raises(TypeError, match="tensor_parallel"):
        APOptions(tensor_parallel=2.0)
    assert "tensor_parallel" in APOptions.keywords() and len(APOptions.keywords()) == 7


def test_enable_rejects_a_bool_at_the_call():
    from moreh_ap import option

    with pytest.raises(TypeError, match="tensor_parallel=1"):
        option.enable_advanced_parallelization(tensor_parallel=True)
    assert not option.is_advanced_parallelization_enabled()


def test_cli_tensor_parallel(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["plan", "--model", "gpt2", "--batch-size", "8", "--seq-len", "256", "--devices-per-node", "4",
            "--preset", "a100-40gb", "--json"]
    assert main(args + ["--tensor-parallel", "1"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {c["config"]["tp"] for c in d["candidates"]} == {1}
    assert main(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert {c["config"]["tp"] for c in d["candidates"]} == {1, 2, 4}
    assert "tp_comm" in d["selected"]["time_breakdown"]
    assert main(args + ["--tensor-parallel", "3"]) == 1
    assert "tensor_parallel=3" in capsys.readouterr().err
    assert main(args + ["--config", "num_stages : 1, num_micro_batches : 1, batch_per_device : 4, TP : 2, "
                                    "recomputation : 0, distribute_param : false, distribute_low_prec_param : false"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["config"]["tp"] == 2 and one["time_breakdown"]["tp_comm"] > 0


# --------------------------------------------------------------------- the planner's shortcut over pipeline ranks
@pytest.mark.parametrize("schedule, spr", [("GPipe", 1), ("1F1B", 1), ("Interleaved1F1B", 2)])
def test_estimate_peak_equals_the_busiest_rank(schedule, spr):
    model = tiny_gpt2(layers=12)
    ids = torch.randint(0, 100, (8, 32))
    graph = trace(model, (ids,), {"labels": ids})
    f = tp_facts(model)
    for tp in (1, 2):
        g = local_graph(graph, f, tp)
        cases = ((4, None), (4, (2, 7, 9)), (6, (1, 2, 5, 6, 10)), (6, None)) if spr == 1 else (
            (4, None), (4, (1, 2, 3, 5, 6, 8, 9)), (6, None))
        for pp, bounds in cases:
            for rec in (False, True):
                for nmb in (2, 8):
                    cfg = ParallelConfig(num_stages=pp, num_micro_batches=nmb, batch_per_device=8 // nmb, tp=tp,
                                         recomputation=rec, distribute_param=True, schedule=schedule,
                                         stages_per_rank=spr, boundaries=bounds)
                    world = pp * tp * 2  # dp 2
                    assert memory.estimate_peak(g, cfg, world_size=world) == memory.estimate(g, cfg, world_size=world)


def test_floor_rejections_are_under_the_exact_peak_and_the_no_fit_message_is_exact():
    import re

    from moreh_ap.planner.planning import evaluate_config

    graph, f, c = _gpt2_on_small_devices()
    p = plan_graph(graph, cluster=c, tp=f, use_measurements=False)
    floored = [x for x in p.candidates if "at least" in (x.reason or "")]
    assert floored and all(not x.feasible for x in floored)
    for x in floored[:20]:
        exact = evaluate_config(graph, x.config, cluster=c, tp=f)
        assert x.memory.total <= exact.memory.total and not exact.feasible
    with pytest.raises(NoFeasibleConfigError) as info:
        plan_graph(graph, cluster=c, tp=f, options=dict(pipeline_parallel=False, distribute_parameter=False,
                                                         tensor_parallel=1), use_measurements=False)
    line, need = re.search(r"Best candidate \((.*?)\) requests ([\d,]+) bytes", str(info.value)).groups()
    exact = evaluate_config(graph, ParallelConfig.from_moreh_line(line), cluster=c, tp=f)
    assert exact.memory.total == int(need.replace(",", ""))


def test_llama_degrees_follow_its_kv_heads():
    model = tiny_llama(layers=2)
    c = Cluster.preset("h100-80gb", nodes=1, devices_per_node=4)
    p = plan(model, (torch.randint(0, 128, (8, 32)),), cluster=c)
    assert {x.config.tp for x in p.candidates} == {1, 2}  # 4 heads, 2 KV heads
    g2 = local_graph(p.graph, tp_facts(model), 2)
    block, block2 = p.graph.blocks[0], g2.blocks[0]
    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    split = sum(m.weight.numel() for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                                          mlp.up_proj, mlp.down_proj))
    assert block.num_params - block2.num_params == split // 2
