# The planner with the vocabulary-parallel loss: which plans have it, the head of one TP rank, its collectives, memory.
"""Families whose TP plan splits the head with :class:`~moreh_ap.models.vocab_head.VocabParallelHead` are planned
with the runtime's parallel loss: one TP rank's head (logits, their fp32 copy, log-softmax, gradient) is fitted
through the traced rank whose head holds half of the vocabulary; the logits' all-gather is replaced by three
all-reduces of one fp32 per token; the head's backward holds three fp32 tensors of the rank's logits (torch's fused
nll / log-softmax backward), as ``tests/unit/test_memory_ties_tp.py`` measures."""
import dataclasses

import pytest
import torch

from moreh_ap.config import ParallelConfig
from moreh_ap.graph import trace
from moreh_ap.planner import Cluster, cost
from moreh_ap.planner.memory import _node_acts
from moreh_ap.planner.time_model import collective_time
from moreh_ap.planner.tp import local_graph, tp_comm_seconds, tp_facts, vocab_parallel_loss
from tests.helpers.models import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_gpt2(layers=2)
    ids = torch.randint(0, 100, (8, 32))
    return model, trace(model, (ids,), {"labels": ids}), tp_facts(model, (ids,), {"labels": ids})


def test_facts_have_the_parallel_loss_where_the_head_is_split():
    assert tp_facts(tiny_gpt2(layers=1)).vocab_loss
    assert tp_facts(tiny_llama(layers=1)).vocab_loss
    assert tp_facts(tiny_llama(layers=1, pad_token_id=0)).vocab_loss  # embedding replicated, head split
    # a head tied to a replicated embedding (padding_idx) is replicated too: its logits are whole
    assert not tp_facts(tiny_llama(layers=1, pad_token_id=0, tie_word_embeddings=True)).vocab_loss


def test_local_head_is_the_traced_ranks_and_fits_other_degrees(gpt2):
    model, graph, facts = gpt2
    traced = facts.local.head()
    assert traced is not None and traced.kind == "post"
    whole = graph.nodes[-1]
    two, four = local_graph(graph, facts, 2), local_graph(graph, facts, 4)
    assert vocab_parallel_loss(two) and vocab_parallel_loss(four) and not vocab_parallel_loss(graph)
    h2, h4 = two.nodes[-1], four.nodes[-1]
    for key in ("saved_bytes", "peak_fwd_bytes", "out_bytes"):
        for prec, v in getattr(whole, key).items():
            t = getattr(traced, key)[prec]
            assert abs(getattr(h2, key)[prec] - t) <= 1, (key, prec)
            part = 2 * t - v  # what the split leaves whole (the norm, the head's input)
            assert abs(getattr(h4, key)[prec] - (part + (v - part) / 4)) <= 1, (key, prec)
    logits = 8 * 32 * 100 * 4
    assert whole.out_bytes["full"] == logits + 4  # the logits and the loss
    assert h2.out_bytes["full"] == logits // 2 + 4
    assert h2.saved_bytes["full"] <= whole.saved_bytes["full"] - logits // 2 + 4  # the fp32 log-probabilities
    plain = local_graph(graph, dataclasses.replace(facts, vocab_loss=False), 2)
    assert plain.nodes[-1].out_bytes == whole.out_bytes and not vocab_parallel_loss(plain)


def test_without_an_example_the_logits_terms_are_divided(gpt2):
    model, graph, _ = gpt2
    g = local_graph(graph, tp_facts(model), 2)
    head, whole = g.nodes[-1], graph.nodes[-1]
    assert head.out_bytes == {k: v // 2 for k, v in whole.out_bytes.items()}
    assert head.peak_fwd_bytes == {k: v // 2 for k, v in whole.peak_fwd_bytes.items()}
    logits = whole.out_bytes["full"]
    assert head.saved_bytes["full"] == int(whole.saved_bytes["full"] - logits / 2)


def test_tp_comm_has_three_token_all_reduces_instead_of_the_logits_all_gather(gpt2):
    from moreh_ap.graph.model_graph import NodeInfo

    model, graph, facts = gpt2
    c = Cluster.preset("h100-80gb", nodes=1, devices_per_node=4)
    head = local_graph(graph, facts, 2).nodes[-1]
    gathered = local_graph(graph, dataclasses.replace(facts, vocab_loss=False), 2).nodes[-1]  # whole logits
    m, k, _, b, _ = head.gemms["full"][0]
    assert m == 8 * 32 and k == 64

    def ar(nbytes):
        return collective_time(c, "all_reduce", nbytes, group=2, inter_node=False)

    for scale in (1.0, 64.0):
        grad_in = ar(m * k * b * scale * 4)
        vocab = tp_comm_seconds([head], cluster=c, tp=2, prec="full", scale=scale, recompute=False, vocab_loss=True)
        assert vocab == pytest.approx(3 * ar(m * b * scale * 4) + grad_in)
        gather = tp_comm_seconds([gathered], cluster=c, tp=2, prec="full", scale=scale, recompute=False)
        assert gather == pytest.approx(collective_time(c, "all_gather", gathered.out_bytes["full"] * scale, group=2,
                                                       inter_node=False) + grad_in)
    # a Llama-7B-sized head (4096 tokens, hidden 4096, 32000 words): 500 MiB of fp32 logits not gathered
    tokens, hidden, words = 4096, 4096, 32000
    big = NodeInfo(name="head", kind="post", out_bytes={"full": tokens * words * 4},
                   gemms={"full": ((tokens, hidden, words, 1, 1),)})
    kw = dict(cluster=c, tp=2, prec="full", scale=1.0, recompute=False)
    grad_in = ar(tokens * hidden * 4)  # the head's input gradient, all-reduced either way
    assert tp_comm_seconds([big], vocab_loss=True, **kw) - grad_in < 0.05 * (tp_comm_seconds([big], **kw) - grad_in)
    cfg = ParallelConfig(num_stages=1, num_micro_batches=2, batch_per_device=4, tp=2, mixed_precision=False)
    g2 = local_graph(graph, facts, 2)
    scale = cfg.batch_per_device / graph.batch_size
    per_mb = tp_comm_seconds(g2.nodes, cluster=c, tp=2, prec="full", scale=scale, recompute=False, vocab_loss=True,
                          sequence_parallel=True)
    assert cost.estimate(g2, cfg, c, world_size=2).tp_comm == pytest.approx(2 * per_mb)


def test_the_heads_backward_holds_three_fp32_logits_of_the_rank(gpt2):
    _, graph, facts = gpt2
    g2 = local_graph(graph, facts, 2)
    head, prev = g2.nodes[-1], g2.nodes[-2]
    local = head.out_bytes["full"]
    for prec in ("full", "mixed"):  # bf16 logits are made fp32 by the loss: the same three fp32 tensors
        _, trans, _, _ = _node_acts(g2, head, prev, prec=prec, scale=2.0, recompute=False)
        assert trans == max(2 * head.peak_fwd_bytes[prec] * 2.0, 3 * local * 2.0)
    plain = local_graph(graph, dataclasses.replace(facts, vocab_loss=False), 2)
    _, trans, _, _ = _node_acts(plain, plain.nodes[-1], plain.nodes[-2], prec="full", scale=1.0, recompute=False)
    assert trans == 2 * plain.nodes[-1].peak_fwd_bytes["full"]


def test_local_blocks_keep_their_share_of_the_heads_attention(gpt2):
    """One TP rank runs ``heads / tp`` of each attention call: the census's batch x heads is split like fwd_flops."""
    _, graph, facts = gpt2
    whole, half = graph.blocks[0], local_graph(graph, facts, 2).blocks[0]
    assert whole.attention["mixed"]
    for prec, calls in whole.attention.items():
        assert half.attention[prec] == tuple((bh // 2, *rest) for bh, *rest in calls)
