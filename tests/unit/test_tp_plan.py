# Tensor-parallel plans of the model families, GPT-2's q/k/v re-lay, and the runtime's checks of tp at the user's call.
from __future__ import annotations

import pytest
import torch
from torch import nn

from moreh_ap.models import find_adapter
from moreh_ap.models.tp_plan import Relay, from_tp_order, relay_permutation, split_kind, to_tp_order
from moreh_ap.runtime.tp import check_tp
from tests.helpers.runtime_cases import build_model


def test_relay_permutation_puts_each_ranks_q_k_v_together():
    assert relay_permutation(6, n=3, tp=2).tolist() == [0, 2, 4, 1, 3, 5]
    assert relay_permutation(12, n=3, tp=1).tolist() == list(range(12))
    with pytest.raises(ValueError, match="not divisible by 6"):
        relay_permutation(9, n=3, tp=2)


def test_gpt2_c_attn_relay_gives_each_rank_whole_heads_and_undoes_exactly():
    model = build_model("gpt2", 0)
    attn = model.transformer.h[0].attn
    w, b = attn.c_attn.weight.detach(), attn.c_attn.bias.detach()
    e, heads, tp = attn.embed_dim, attn.num_heads, 2
    x = torch.randn(3, e)
    q, k, v = (x @ w + b).split(e, dim=1)
    plan = find_adapter(model).tp_plan()
    relays = {name: Relay(dim=dim, perm=relay_permutation(3 * e, n=n, tp=tp)) for name, (dim, n) in plan.relay.items()}
    w_tp = to_tp_order(w, relays["attn.c_attn.weight"])
    b_tp = to_tp_order(b, relays["attn.c_attn.bias"])
    c = e // tp
    for r in range(tp):  # rank r's column chunk, split as its local attention does (split_size = e / tp)
        lq, lk, lv = (x @ w_tp[:, r * 3 * c:(r + 1) * 3 * c] + b_tp[r * 3 * c:(r + 1) * 3 * c]).split(c, dim=1)
        torch.testing.assert_close(lq, q[:, r * c:(r + 1) * c], rtol=0, atol=0)
        torch.testing.assert_close(lk, k[:, r * c:(r + 1) * c], rtol=0, atol=0)
        torch.testing.assert_close(lv, v[:, r * c:(r + 1) * c], rtol=0, atol=0)
    plain = (x @ w[:, :3 * c] + b[:3 * c]).split(c, dim=1)  # a plain column split: rank 0 gets q and part of k
    assert not torch.allclose(plain[1], k[:, :c])
    assert torch.equal(from_tp_order(w_tp, relays["attn.c_attn.weight"]), w)
    assert torch.equal(from_tp_order(b_tp, relays["attn.c_attn.bias"]), b)
    assert heads % tp == 0 and plan.local_attrs == {"attn": ("split_size", "num_heads")}


def test_families_with_and_without_a_plan():
    llama = find_adapter(build_model("llama", 0)).tp_plan()
    splits = {k for k, v in llama.block.items() if split_kind(v) is not None}
    assert splits == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert set(llama.block) - splits == {"input_layernorm", "post_attention_layernorm", "self_attn", "mlp"}
    assert llama.divisible == {"attention heads": 4, "key/value heads": 2}
    assert set(find_adapter(build_model("gpt2", 0)).tp_plan().outer) == {"transformer.wte", "transformer.wpe",
                                                                        "transformer.ln_f", "lm_head"}
    for kind in ("mlp", "gpt"):
        assert find_adapter(build_model(kind, 0)).tp_plan() is None


def test_check_tp_names_the_cause_and_the_way_out():
    with pytest.raises(NotImplementedError, match="no tensor-parallel plan.*use tp=1"):
        check_tp(find_adapter(build_model("gpt", 0)), 2)
    with pytest.raises(ValueError, match=r"tp=4 does not divide the model's key/value heads \(2\)"):
        check_tp(find_adapter(build_model("llama", 0)), 4)
    assert check_tp(find_adapter(build_model("llama", 0)), 2).divisible["attention heads"] == 4


def test_parallelize_rejects_tp_for_a_family_without_a_plan_at_the_call(monkeypatch):
    import moreh_ap
    from moreh_ap.config import ParallelConfig

    monkeypatch.setattr("moreh_ap.runtime.engine.world_size", lambda: 2)
    cfg = ParallelConfig(num_stages=1, tp=2, num_micro_batches=1, batch_per_device=1)
    with pytest.raises(NotImplementedError, match="no tensor-parallel plan"):
        moreh_ap.parallelize(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), cfg)


def test_a_llama_like_model_with_fused_projections_has_no_plan():
    """Phi-3 matches the Llama-family layout (model.model.layers, embed_tokens, norm, rotary_emb) but fuses q/k/v
    and gate/up: the column / row plan does not fit, so there is no plan (tp > 1 refused before any memory is
    touched, the planner searches tp = 1 only) instead of a shape error in the first step."""
    import pytest
    import transformers

    from moreh_ap.runtime.tp import check_tp

    cfg = transformers.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    adapter = find_adapter(transformers.Phi3ForCausalLM(cfg))
    assert adapter.name == "Hugging Face Llama-family" and adapter.tp_plan() is None
    with pytest.raises(NotImplementedError, match="no tensor-parallel plan"):
        check_tp(adapter, 2)
