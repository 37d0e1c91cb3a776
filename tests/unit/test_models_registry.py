# Tests for moreh_ap.models: one registry gives the planner and the runtime the same blocks; no plan it cannot run.
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import moreh_ap
from tests.helpers.runtime_cases import build_model
from moreh_ap.config import ParallelConfig
from moreh_ap.graph import trace
from moreh_ap.layout import ParallelLayout, stage_ranges
from moreh_ap.models import (BlockListAdapter, GenericAdapter, GPT2Adapter, LlamaAdapter, ModelAdapter, NanoGPTAdapter,
                             SequentialAdapter, find_adapter, find_blocks, is_hf_model, register_adapter,
                             registered_adapters)
from moreh_ap.planner import Cluster, enumerate_candidates, plan
from moreh_ap.runtime import apply as A
from tests.helpers.models import TinyGPT, mlp, tiny_gpt2, tiny_llama, tiny_neox
from tests.helpers.script_models import GPT, GPTConfig

pytestmark = pytest.mark.timeout(120)
GIB = 1024**3

FAMILIES = {
    SequentialAdapter: lambda: (mlp(depth=3), (torch.randn(4, 16),), {}),
    LlamaAdapter: lambda: (tiny_llama(4), (torch.randint(0, 128, (4, 16)),), None),
    GPT2Adapter: lambda: (tiny_gpt2(4), (torch.randint(0, 100, (4, 16)),), None),
    BlockListAdapter: lambda: (build_model("gpt", 0), (torch.randint(0, 64, (4, 16)),), {}),
    NanoGPTAdapter: lambda: (GPT(GPTConfig()), (torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))), {}),
    GenericAdapter: lambda: (tiny_neox(4), (torch.randint(0, 128, (4, 16)),), None),
}
"""A tiny model of every family, with one batch (kwargs None: ``labels=`` the input ids)."""


def _family(cls):
    model, args, kwargs = FAMILIES[cls]()
    return model, args, {"labels": args[0]} if kwargs is None else kwargs


def test_every_registered_family_has_a_tiny_model_here():
    assert set(FAMILIES) == set(registered_adapters()) | {GenericAdapter}


@pytest.mark.parametrize("cls", list(FAMILIES), ids=lambda c: c.__name__)
def test_planner_blocks_are_the_runtime_blocks(cls):
    model, args, kwargs = _family(cls)
    adapter = find_adapter(model)
    assert type(adapter) is cls
    assert (adapter.tp_plan() is not None) == (cls in (LlamaAdapter, GPT2Adapter))  # the families with a TP plan
    graph = trace(model, args, kwargs)
    planner = [model.get_submodule(b.fqns[0]) for b in graph.blocks]
    runtime = [m for _, m in adapter.blocks()]
    assert len(planner) == len(runtime) >= 3
    assert all(a is b for a, b in zip(planner, runtime))
    assert graph.block_container == adapter.container_path and graph.adapter_name == adapter.name
    assert graph.supports_pipeline == adapter.supports_pipeline == (cls is not GenericAdapter)
    # pp = 1: the runtime wraps the blocks of the same container (recompute, per-block FSDP units)
    layout = ParallelLayout.from_config(ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=4), 1)
    (stage,) = A.apply_pipeline(adapter, layout, pp_rank=0, ranges=layout.stage_ranges(len(runtime)))
    assert stage.module is model and [m for m in stage.container.children()] == runtime
    if not adapter.supports_pipeline:
        with pytest.raises(NotImplementedError, match="pipeline"):
            adapter.build_stage(0, 1, first=True, last=False)
        return
    # pp > 1: the stages' block containers hold the same modules, in the same order
    staged = []
    ranges = stage_ranges(len(runtime), 3, None)
    for s, (lo, hi) in enumerate(ranges):
        _, container = adapter.build_stage(lo, hi, first=s == 0, last=s == len(ranges) - 1)
        staged.extend(container.children())
    assert len(staged) == len(runtime) and all(a is b for a, b in zip(staged, runtime))


def test_generic_adapter_finds_blocks_but_no_pipeline():
    assert find_blocks(tiny_neox(2)) == ("gpt_neox.layers", ["gpt_neox.layers.0", "gpt_neox.layers.1"])
    assert type(find_adapter(TinyGPT(layers=2))) is GenericAdapter  # a "blocks" list: the planner costs it
    odd = find_adapter(nn.Linear(3, 3))
    assert type(odd) is GenericAdapter and odd.container() is None and odd.blocks() == [] and odd.block_fqns() == []
    assert is_hf_model(tiny_neox(1)) and not is_hf_model(TinyGPT(layers=1))


def test_block_list_as_module_dict_is_planned_on_its_blocks():
    class Titan(nn.Module):  # torchtitan keeps its layers in a ModuleDict
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(8, 8)
            self.layers = nn.ModuleDict({str(i): nn.Linear(8, 8) for i in range(3)})
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            x = self.emb(x) if self.emb is not None else x
            for layer in self.layers.values():
                x = layer(x)
            return self.out(x) if self.out is not None else x

    model = Titan()
    assert type(find_adapter(model)) is BlockListAdapter
    assert find_blocks(model) == ("layers", ["layers.0", "layers.1", "layers.2"])
    graph = trace(model, (torch.randn(4, 8),))
    assert graph.num_blocks == 3 and graph.supports_pipeline and graph.pre.fqns == ("emb",)


def test_hf_loss_handling_comes_from_the_adapter():
    neox, gpt = find_adapter(tiny_neox(1)), find_adapter(build_model("gpt", 0))
    assert neox.hf_model and not neox.hf_causal_lm and neox.vocab_size() == 128
    assert neox.loss_function() == neox.model.loss_function
    assert not gpt.hf_model and gpt.loss_function() is None
    llama = find_adapter(tiny_llama(1))
    assert llama.hf_model and llama.hf_causal_lm and llama.loss_function() is not None


def test_tiny_gpt_neox_is_planned_without_pipelining():
    model = tiny_neox(4)
    ids = torch.randint(0, 128, (8, 32))
    graph = trace(model, (ids,), {"labels": ids})
    assert graph.num_blocks == 4 and not graph.supports_pipeline
    assert graph.to_dict()["supports_pipeline"] is False
    cluster = Cluster.preset("h100-80gb", nodes=1, devices_per_node=4).with_(device_memory=80 * GIB)
    p = plan(graph, cluster=cluster)
    assert p.candidates and all(c.config.num_stages == 1 for c in p.candidates)
    p.config.validate(4, 8, graph.num_blocks)
    # the user asking for stages does not change that: the runtime would run one stage anyway
    p2 = plan(graph, cluster=cluster, options={"num_stages": 2})
    assert all(c.config.num_stages == 1 for c in p2.candidates)


def test_candidates_without_pipeline_support():
    cands = enumerate_candidates(world_size=4, global_batch=8, num_blocks=40, supports_pipeline=False)
    assert cands and {c.num_stages for c in cands} == {1}
    assert {c.num_stages for c in enumerate_candidates(world_size=4, global_batch=8, num_blocks=40)} == {1, 2, 4}


def test_generic_model_runs_at_pp1_with_per_block_recompute():
    model = tiny_neox(3)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 128, (4, 16))
    cfg = ParallelConfig(num_stages=2, num_micro_batches=2, batch_per_device=2, recomputation=True,
                         mixed_precision=False)
    with pytest.warns(UserWarning, match="no pipeline split"):
        pm = moreh_ap.parallelize(model, cfg)
    assert pm.config.num_stages == 1
    wrapped = list(model.gpt_neox.layers.children())
    assert all(type(b).__name__ == "CheckpointWrapper" for b in wrapped)  # per block, as the planner costs it
    loss = pm.train_step(input_ids=ids, labels=ids)
    torch.testing.assert_close(loss, ref(input_ids=ids, labels=ids).loss.detach(), rtol=1e-5, atol=1e-6)
    assert set(pm.full_state_dict()) == set(ref.state_dict())


def test_register_adapter_puts_a_family_first_and_back():
    class Marked(nn.Sequential):
        pass

    class MarkedAdapter(SequentialAdapter):
        name = "marked"

        @classmethod
        def matches(cls, model):
            return isinstance(model, Marked)

    before = registered_adapters()
    try:
        assert register_adapter(MarkedAdapter) is MarkedAdapter
        assert registered_adapters()[0] is MarkedAdapter
        assert find_adapter(Marked(nn.Linear(2, 2))).name == "marked"
        assert type(find_adapter(nn.Sequential(nn.Linear(2, 2)))) is SequentialAdapter
        register_adapter(MarkedAdapter, before=BlockListAdapter)
        assert registered_adapters().index(MarkedAdapter) == registered_adapters().index(BlockListAdapter) - 1
        assert find_adapter(Marked(nn.Linear(2, 2))).name == "nn.Sequential"  # Sequential is tried first now
    finally:
        import moreh_ap.models.registry as registry

        registry._ADAPTERS[:] = before
    with pytest.raises(TypeError, match="ModelAdapter"):
        register_adapter(nn.Linear)
    with pytest.raises(ValueError, match="registered"):
        register_adapter(MarkedAdapter, before=ModelAdapter)
    assert registered_adapters() == before
