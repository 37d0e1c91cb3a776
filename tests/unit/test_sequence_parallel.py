# Sequence parallelism under tensor parallelism: the plans' styles, the stage edges, the planner's view of it.
"""One process. The runtime equivalence of sequence parallelism (every norm on 1/tp of the sequence, losses and
weights equal to one process, pipelines included) is in tests/distributed/test_tensor_parallel.py; here:

- the families' plans: norms ``SequenceParallel``, row splits reduce-scatter onto the sequence, attention / MLP
  gather it, only column / row styles count as parameter splits (:func:`moreh_ap.models.tp_plan.split_kind`);
- :class:`~moreh_ap.models.base.SequenceStage`: a pipeline stage sends its rank's sequence shard and rebuilds the
  whole-sequence DTensor from the received one (a fake 2-rank process group);
- the step runner refuses, on every rank and before the schedule, a sequence a pipeline cannot split over tp;
- the planner: the residual stream (embedding and block outputs) ``/ tp``, the same collective bytes as without it;
- the trace's residual-stream bytes (:mod:`moreh_ap.graph.sequence_saved`: norms, residual-sized dropouts).
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import moreh_ap
from moreh_ap.errors import InputError
from moreh_ap.models import find_adapter
from moreh_ap.models.tp_plan import split_kind
from moreh_ap.planner.cluster import Cluster
from moreh_ap.planner.tp import local_graph, sequence_sharded, tp_comm_seconds, tp_facts
from tests.helpers.pipeline_memory_cases import build

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("kind,norms,rows", [
    ("llama", ("input_layernorm", "post_attention_layernorm"), ("self_attn.o_proj", "mlp.down_proj")),
    ("gpt2", ("ln_1", "ln_2"), ("attn.c_proj", "mlp.c_proj")),
])
def test_family_plans_keep_the_residual_stream_sequence_sharded(kind, norms, rows):
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import SequenceParallel

    with torch.device("meta"):
        model = build(kind, seq=16)
    plan = find_adapter(model).tp_plan()
    assert plan.sequence_parallel
    for n in norms:
        assert isinstance(plan.block[n], SequenceParallel) and split_kind(plan.block[n]) is None
    for r in rows:
        style = plan.block[r]
        assert split_kind(style) == "row" and style.output_layouts == (Shard(1),) and not style.use_local_output
    gathers = [k for k, v in plan.block.items() if type(v).__name__ == "GatherSequence"]
    assert sorted(gathers) == sorted({r.split(".")[0] for r in rows})
    head = plan.outer["lm_head"]
    assert split_kind(head) == "column" and head.input_layouts == (Shard(1),)


def test_sequence_stage_sends_its_shard_and_rebuilds_the_whole_sequence():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moreh_ap.models.base import SequenceStage

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        stage = SequenceStage()
        x = torch.randn(3, 5, 8)
        assert stage.sequence_in(x) is x  # no mesh: plain tensors on the edges
        stage.sequence_mesh = init_device_mesh("cpu", (2,))
        h = stage.sequence_in(x)
        assert isinstance(h, DTensor) and tuple(h.placements) == (Shard(1),) and h.shape == (3, 10, 8)
        out = stage.sequence_out(h * 2)
        assert type(out) is torch.Tensor and out.shape == (3, 5, 8)
        torch.testing.assert_close(out, x * 2)
    finally:
        dist.destroy_process_group()


def _runner(tp: int, *, sequence: bool):
    from moreh_ap.runtime.steps import StepRunner

    module = SimpleNamespace(sequence_mesh=object() if sequence else None)
    runner = object.__new__(StepRunner)
    runner.layout, runner.stages = SimpleNamespace(tp=tp), [SimpleNamespace(module=module)]
    return runner


def test_a_pipeline_refuses_a_sequence_it_cannot_split_over_tp():
    ids = torch.zeros(4, 9, dtype=torch.long)
    with pytest.raises(InputError, match=r"9 positions cannot be split over tp=2.*multiple of 2"):
        _runner(2, sequence=True)._check_sequence_split((ids,))
    _runner(2, sequence=True)._check_sequence_split((torch.zeros(4, 10, dtype=torch.long),))
    _runner(2, sequence=False)._check_sequence_split((ids,))  # plain edges: any length
    _runner(1, sequence=True)._check_sequence_split((ids,))


def test_planner_shards_the_residual_stream_and_keeps_the_collective_bytes():
    with torch.device("meta"):
        model = build("llama", seq=64)
    ids = torch.empty(4, 64, dtype=torch.long, device="meta")
    graph = moreh_ap.trace(model, (ids,), {"labels": ids})
    facts = tp_facts(model)
    two = local_graph(graph, facts, 2)
    assert sequence_sharded(two) and not sequence_sharded(graph)
    for whole, local in zip(graph.nodes, two.nodes):  # the head's logits: vocabulary-sharded (parallel loss)
        assert local.out_bytes == {k: v // 2 for k, v in whole.out_bytes.items()}, local.name
    # the same tensors reduce-scattered and all-gathered as all-reduced without it: the same seconds
    plain = local_graph(graph, dataclasses.replace(facts, sequence_parallel=False), 2)
    assert not sequence_sharded(plain)
    cluster = Cluster.preset("a100-80gb")
    kw = dict(cluster=cluster, tp=2, prec="full", scale=1.0, recompute=False, vocab_loss=True)
    assert tp_comm_seconds(two.nodes, sequence_parallel=True, **kw) == pytest.approx(tp_comm_seconds(plain.nodes, **kw))


def test_the_trace_counts_what_a_block_saves_on_its_residual_stream():
    """Norms' saved tensors, plus one mask per dropout of the residual's size (GPT-2: after attention and after
    the MLP); an eager attention's dropout of probabilities (split by heads) is not counted."""
    from transformers import GPT2Config, GPT2LMHeadModel

    batch, seq, hidden = 2, 32, 64  # heads * seq != hidden: probabilities and residual differ in size
    ids = torch.empty(batch, seq, dtype=torch.long, device="meta")

    def residual_saved(pdrop: float, attn: str) -> int:
        cfg = GPT2Config(vocab_size=128, n_embd=hidden, n_layer=2, n_head=4, n_positions=seq, resid_pdrop=pdrop,
                         embd_pdrop=pdrop, attn_pdrop=pdrop)
        cfg._attn_implementation = attn
        with torch.device("meta"):
            model = GPT2LMHeadModel(cfg).train()
        graph = moreh_ap.trace(model, (ids,), {"labels": ids}, precisions=("full",))
        return graph.blocks[0].norm_saved_bytes["full"]

    norms = residual_saved(0.0, "sdpa")
    masks = residual_saved(0.1, "sdpa") - norms
    assert norms > 0 and masks > 0 and masks % (2 * batch * seq * hidden) == 0  # two residual-sized masks
    assert residual_saved(0.1, "eager") - norms == masks  # the probabilities' dropout is not on the stream
