# Tensor + sequence parallelism (DTensor) against one process: tp 2, dp 2 x tp 2 (FSDP2 / replicate), pp 2 x tp 2.
"""Each case trains 3 steps through ``moreh_ap.parallelize`` with ``tp > 1`` on gloo CPU ranks and is compared
with the same model trained in one process on the same global batches: losses, global grad norms (a parameter
replicated over tp counted once) and every final weight (fp32: ``rtol=1e-4, atol=1e-5``; bf16 loose, as the
runtime equivalence tests), the optimizer state in one-device format, and the one-device state dicts loaded
back. GPT-2 covers the q/k/v re-lay of its fused ``c_attn`` (its full state dict undoes it) and the tied
``wte`` / ``lm_head`` (one DTensor after TP). Every case also checks sequence parallelism: each norm ran on
its rank's 1/tp of the sequence (a ``Shard(1)`` DTensor), pipeline stages included. One launch per world size
(start-up dominates), shared with the runtime equivalence tests.
"""
from __future__ import annotations

import math

import pytest
import torch

from moreh_ap.config import ParallelConfig
from tests.helpers.dist_harness import register, shared_results
from tests.helpers.runtime_cases import assert_close_fp32, reference_run, update_rel_error

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(900)]

PROBE = "tests.helpers.tp_cases:tp_probe"


def _cfg(**kw) -> dict:
    kw.setdefault("batch_per_device", 2)
    kw.setdefault("num_stages", 1)
    kw.setdefault("mixed_precision", False)
    return ParallelConfig(**kw).to_dict()


CASES = [
    {"id": "llama-tp2-mb2", "model": "llama", "world": 2, "probe": PROBE, "eval": True, "seq_last": 9,
     "cfg": _cfg(tp=2, num_micro_batches=2)},
    {"id": "gpt2-tp2-tied-clip", "model": "gpt2", "world": 2, "probe": PROBE, "clip": 0.5, "padding": True,
     "cfg": _cfg(tp=2, num_micro_batches=1)},
    {"id": "llama-tp2-lamb", "model": "llama", "world": 2, "optim": "lamb", "cfg": _cfg(tp=2, num_micro_batches=1)},
    {"id": "qwen2-tp2-bias", "model": "qwen2", "world": 2, "cfg": _cfg(tp=2, num_micro_batches=1)},
    {"id": "mistral-tp2-sliding-padding", "model": "mistral", "world": 2, "padding": True,
     "cfg": _cfg(tp=2, num_micro_batches=1)},
    {"id": "llama-tp2-loss-outside-lamb", "model": "llama", "world": 2, "optim": "lamb", "loss_outside": True,
     "cfg": _cfg(tp=2, num_micro_batches=1)},
    {"id": "gpt2-tp2-bf16-rc", "model": "gpt2", "world": 2,
     "cfg": _cfg(tp=2, num_micro_batches=2, mixed_precision=True, recomputation=True)},
    {"id": "llama-dp2tp2-fsdp-zero3", "model": "llama", "world": 4, "probe": PROBE,
     "cfg": _cfg(tp=2, num_micro_batches=2, distribute_param=True, distribute_low_prec_param=True)},
    {"id": "gpt2-dp2tp2-replicate", "model": "gpt2", "world": 4, "probe": PROBE,
     "cfg": _cfg(tp=2, num_micro_batches=2)},
    {"id": "gpt2-pp2tp2-1F1B-tied", "model": "gpt2", "world": 4, "probe": PROBE,
     "cfg": _cfg(tp=2, num_stages=2, num_micro_batches=2)},
    # sequence shards across an interleaved pipeline's 4 stages, with the padding mask passed along, recomputed
    {"id": "llama-pp2tp2-Interleaved-rc-padding", "model": "llama", "world": 4, "padding": True,
     "cfg": _cfg(tp=2, num_stages=2, num_micro_batches=2, batch_per_device=1, schedule="Interleaved1F1B",
                 stages_per_rank=2, recomputation=True)},
]
register("runtime", CASES)  # the runtime equivalence tests' launches: one start-up per world size for both


def _results(world: int) -> dict:
    return shared_results("runtime", world)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_tensor_parallel_equals_one_process(case):
    got = _results(case["world"])[case["id"]]
    cfg = ParallelConfig.from_dict(case["cfg"])
    ref = reference_run(case, cfg.global_batch(case["world"]))
    assert list(got["state"]) == list(ref["state"]), "full_state_dict names differ from the model's state_dict"
    assert got["loss_spread"] == 0.0, "train_step returned different losses on different ranks"
    _check_sequence_parallel(got["norm_inputs"], tp=cfg.tp)
    if cfg.mixed_precision:
        lr = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"]))
        nr = max(abs(a - b) / abs(b) for a, b in zip(got["grad_norms"], ref["grad_norms"]))
        ur = update_rel_error(got["state"], ref["state"], ref["init"])
        assert lr <= 2e-3 and nr <= 5e-2 and ur <= 0.15, f"bf16 bounds: loss {lr:.2e} norm {nr:.2e} update {ur:.2e}"
        return
    assert_close_fp32(got["losses"], ref["losses"], "losses")
    assert_close_fp32(got["grad_norms"], ref["grad_norms"], "global grad norms (replicated parameters once)")
    for k, v in ref["state"].items():
        assert_close_fp32(got["state"][k], v, k)
    if case.get("eval"):
        assert_close_fp32(got["eval_loss"], ref["eval_loss"], "eval loss")
    if case.get("probe"):
        _check_probe(case, got, ref)


def _check_sequence_parallel(norm_inputs: list, *, tp: int) -> None:
    """Every norm of the model (each block's, the final one) ran on rank 0's share of the sequence (the first
    ceil(S / tp) positions, an uneven S included), as a Shard(1) DTensor."""
    assert norm_inputs, "no norm forward was seen"
    for placements, local, whole in norm_inputs:
        assert placements == "(Shard(dim=1),)" and local == -(-whole // tp) < whole, (
            f"a norm's input was {placements} with {local} of {whole} positions: not sequence-parallel")


def _check_probe(case: dict, got: dict, ref: dict) -> None:
    assert got["all_dtensor"], "a parameter of a tensor-parallel stage is not a DTensor"
    if "generate_same" in got:
        assert got["generate_same"], "greedy generate() on the tensor-parallel model differs from one process's"
    if case["model"] == "gpt2":
        assert got["tied"], "lm_head.weight is not transformer.wte.weight (one DTensor) after tensor parallelism"
    osd, rsd = got["opt_state"], ref["opt_state"]
    assert sorted(osd["state"]) == sorted(rsd["state"]), "optimizer state indices differ from one device's"
    for i, st in rsd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert_close_fp32(osd["state"][i][k].float(), v.float(), f"optimizer state {i}.{k}")
    assert got["load_err"] <= 1e-6, f"load_full_state_dict -> full_state_dict changed weights by {got['load_err']}"
    assert got["opt_load_err"] <= 1e-7, f"optimizer state round trip changed it by {got['opt_load_err']}"
    assert math.isfinite(got["load_err"])
