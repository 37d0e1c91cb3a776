# Tests for moreh_ap.graph: block detection and tracing (FakeTensor / meta, no real memory or compute).
import time

import pytest
import torch
from torch import nn

from moreh_ap.graph import ModelGraph, trace
from moreh_ap.models import find_blocks
from tests.helpers.models import TinyGPT, mlp, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.timeout(60)


def test_find_blocks_known_layouts():
    assert find_blocks(tiny_llama(3)) == ("model.layers", ["model.layers.0", "model.layers.1", "model.layers.2"])
    assert find_blocks(tiny_gpt2(2)) == ("transformer.h", ["transformer.h.0", "transformer.h.1"])
    assert find_blocks(mlp(depth=2)) == ("", ["0", "1", "2", "3"])
    assert find_blocks(TinyGPT(layers=3))[1] == ["blocks.0", "blocks.1", "blocks.2"]


def test_find_blocks_any_identical_modulelist_and_none():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
            self.big = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
            self.mixed = nn.ModuleList([nn.Linear(9, 9), nn.Linear(9, 3)])

    assert find_blocks(Net()) == ("big", ["big.0", "big.1"])
    assert find_blocks(nn.Linear(3, 3)) == (None, [])


def test_sequential_mlp_exact_numbers():
    model = mlp(width=16, depth=3)
    x = torch.randn(5, 16)
    g = trace(model, (x,))
    assert isinstance(g, ModelGraph) and g.num_blocks == 6 and g.batch_size == 5
    linears = [n for n in g.blocks if n.num_params]
    assert [n.num_params for n in linears] == [16 * 16 + 16] * 3
    assert all(n.fwd_flops == 2 * 5 * 16 * 16 for n in linears)
    assert g.total_params == sum(p.numel() for p in model.parameters())
    # block 0 (Linear) saves nothing but its input x: no grad needed for it -> nothing saved; ReLU saves its output
    assert g.blocks[1].saved_bytes["full"] == 5 * 16 * 4
    assert g.blocks[1].saved_bytes["mixed"] == 5 * 16 * 2
    assert g.blocks[0].out_bytes == {"mixed": 5 * 16 * 2, "full": 5 * 16 * 4, "autocast_cpu": 5 * 16 * 2,
                                     "autocast_cuda": 5 * 16 * 2}
    # under autocast: the ReLU saves the bf16 output of the linear; the linear (input not requiring grad) saves
    # nothing, not even its bf16 weight copy
    assert g.blocks[1].saved_bytes["autocast_cuda"] == 5 * 16 * 2
    assert g.blocks[0].saved_cast_bytes["autocast_cuda"] == 0
    # identical blocks (Linear 2, 4; ReLU 3, 5) copied from the first one
    assert [n.traced for n in g.blocks] == [True, True, False, False, False, False]


def test_trace_does_not_touch_the_model():
    model = TinyGPT()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 128, (2, 16))
    trace(model, (idx,), {"labels": idx})
    assert all("forward" not in b.__dict__ for b in model.blocks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model(idx, idx).dim() == 0


def test_attention_costed_as_flash_kernel():
    b, t, d, h, layers = 2, 64, 32, 4, 2
    model = TinyGPT(d=d, layers=layers, heads=h, seq=t)
    idx = torch.randint(0, 128, (b, t))
    g = trace(model, (idx,), {"labels": idx})
    blk = g.blocks[0]
    # matmuls: qkv 3d^2, proj d^2, mlp 8d^2 per token (x2 FLOPs) + causal attention 4*b*h*t*t*(d/h) / 2
    dense = 2 * b * t * (3 * d * d + d * d + 8 * d * d)
    attn = 4 * b * h * t * t * (d // h) // 2
    assert blk.fwd_flops == dense + attn
    assert g.blocks[1].fwd_flops == blk.fwd_flops and not g.blocks[1].traced
    # no B*H*T^2 probabilities saved: saved bytes grow linearly with the sequence
    short = trace(model, (idx[:, : t // 2],), {"labels": idx[:, : t // 2]})
    assert blk.saved_bytes["full"] == 2 * short.blocks[0].saved_bytes["full"]


def test_hf_llama_and_gpt2_tiny():
    llama = tiny_llama(4)
    ids = torch.randint(0, 128, (2, 32))
    g = trace(llama, (ids,), {"labels": ids})
    assert g.num_blocks == 4 and g.block_container == "model.layers"
    assert g.total_params == sum(p.numel() for p in llama.parameters())
    assert g.pre.fqns == ("model.embed_tokens",) and "lm_head" in g.post.fqns
    assert g.post.fwd_flops >= 2 * 2 * 32 * 64 * 128  # lm_head matmul
    assert g.blocks[0].saved_bytes["mixed"] < g.blocks[0].saved_bytes["full"]
    gpt2 = tiny_gpt2(3)
    g2 = trace(gpt2, (ids % 100,), {"labels": ids % 100})
    assert g2.num_blocks == 3
    assert len(g2.tied) == 1 and set(g2.tied[0].nodes) == {"embedding", "head"}
    assert g2.total_params == sum(p.numel() for p in gpt2.parameters())
    # a tied parameter is counted on both nodes, once for the whole model
    assert g2.params_of(["embedding", "head"]) == g2.pre.num_params + g2.post.num_params - g2.tied[0].numel


def test_llama2_13b_on_meta_is_fast_and_exact():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                             num_attention_heads=40, vocab_size=32000, use_cache=False))
    ids = torch.empty(8, 1024, dtype=torch.long, device="meta")
    t0 = time.perf_counter()
    g = trace(model, (ids,), {"labels": ids})
    elapsed = time.perf_counter() - t0
    assert g.total_params == 13_015_864_320 and g.num_blocks == 40
    tokens = 8 * 1024
    # forward FLOPs = 2 * N_matmul * tokens + causal attention
    block_params = g.blocks[0].num_params - 2 * 5120  # minus the two RMSNorm weights
    attn = 4 * 8 * 40 * 1024 * 1024 * 128  # HF passes a mask with use_cache=False: the full kernel cost
    assert g.blocks[0].fwd_flops == 2 * block_params * tokens + attn
    assert sum(n.traced for n in g.blocks) == 1
    assert elapsed < 20  # generous: the benchmark tracks the real number


def test_trace_rejects_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        trace("model")
    with pytest.raises(ValueError, match="precisions"):
        trace(mlp(), (torch.randn(2, 16),), precisions=("half",))
