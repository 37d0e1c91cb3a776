# Multi-rank equivalence: every tested ParallelConfig trains the same model as one process (gloo, 1-4 CPU ranks).
"""Each case trains 3 AdamW steps through ``moreh_ap.parallelize`` on real ranks and is compared with
the same model trained in one process on the same global batches.

fp32: losses, global grad norms and every final weight with ``assert_close(rtol=1e-4, atol=1e-5)``.
bf16 (compared with the fp32 reference): loss within 2e-3 relative, grad norm within 5e-2 relative,
and the training update ``final - init`` within 15% (relative 2-norm over all weights) of the
reference's; measured worst cases here are ~1e-4, ~2e-2 and ~6e-2.

All cases of one world size run in ONE launch (start-up dominates), shared with the other files of the
``"runtime"`` group (``dist_harness.register``); CI runs a pairwise covering set
of the valid combinations plus feature cases; ``-m full`` runs every valid combination.
"""
from __future__ import annotations

import math
import time

import pytest
import torch

from tests.helpers.dist_harness import launch, register, shared_results
from tests.helpers.runtime_cases import (FROZEN_PREFIX, all_valid_combos, build_model, combo_case, covering_combos, reference_run,
                            update_rel_error)
from moreh_ap.config import ParallelConfig

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(3600)]


def _cfg(**kw) -> dict:
    kw.setdefault("batch_per_device", 2)
    kw.setdefault("mixed_precision", False)
    return ParallelConfig(**kw).to_dict()


FEATURE_CASES = [
    # padding: attention masks and ignored labels that differ per micro-batch; HF-style pm(...).loss
    {"id": "llama-padding-pp2dp2-1F1B-dist10", "model": "llama", "world": 4, "padding": True, "hf_style": True,
     "eval": True,
     "cfg": _cfg(num_stages=2, num_micro_batches=2, distribute_param=True)},
    {"id": "gpt2-padding-pp2dp1-Interleaved", "model": "gpt2", "world": 2, "padding": True, "hf_style": True,
     "eval": True,
     "cfg": _cfg(num_stages=2, num_micro_batches=4, batch_per_device=1, schedule="Interleaved1F1B",
                 stages_per_rank=2)},
    {"id": "llama-padding-pp1dp2-ddp-mb4", "model": "llama", "world": 2, "padding": True,
     "cfg": _cfg(num_stages=1, num_micro_batches=4, batch_per_device=1)},
    # global-norm clipping across stages and shards (GPT-2: tied wte/lm_head on two stages)
    {"id": "gpt2-clip-pp2dp2-1F1B-dist11", "model": "gpt2", "world": 4, "clip": 0.5,
     "cfg": _cfg(num_stages=2, num_micro_batches=2, distribute_param=True, distribute_low_prec_param=True)},
    {"id": "gpt-clip-pp1dp2-ddp", "model": "gpt", "world": 2, "clip": 0.5,
     "cfg": _cfg(num_stages=1, num_micro_batches=2)},
    {"id": "mlp-clip-pp4dp1-GPipe", "model": "mlp", "world": 4, "clip": 0.1, "eval": True,
     "cfg": _cfg(num_stages=4, num_micro_batches=2, schedule="GPipe")},
    # frozen parameters stay frozen, get no optimizer state
    {"id": "gpt-frozen-pp2dp2-GPipe-dist10", "model": "gpt", "world": 4, "frozen": True,
     "cfg": _cfg(num_stages=2, num_micro_batches=2, schedule="GPipe", distribute_param=True)},
    {"id": "llama-frozen-pp1dp2-dist11", "model": "llama", "world": 2, "frozen": True,
     "cfg": _cfg(num_stages=1, num_micro_batches=1, distribute_param=True, distribute_low_prec_param=True)},
    # short last batch: fewer micro-batches are used, never a wrong split
    {"id": "mlp-short-pp2dp1-1F1B", "model": "mlp", "world": 2, "short_last": 2,
     "cfg": _cfg(num_stages=2, num_micro_batches=4, batch_per_device=1)},
    {"id": "gpt-short-pp2dp2-GPipe-dist11", "model": "gpt", "world": 4, "short_last": 6,
     "cfg": _cfg(num_stages=2, num_micro_batches=2, schedule="GPipe", distribute_param=True,
                 distribute_low_prec_param=True)},
    # another sequence length on the last step (pipelines rebuild their stages for the new shapes)
    {"id": "llama-seqlen-pp2dp1-Interleaved-mb2", "model": "llama", "world": 2, "seq_last": 8,
     "cfg": _cfg(num_stages=2, num_micro_batches=2, schedule="Interleaved1F1B", stages_per_rank=2)},
    {"id": "gpt-seqlen-pp2dp2-1F1B-dist10", "model": "gpt", "world": 4, "seq_last": 5,
     "cfg": _cfg(num_stages=2, num_micro_batches=2, distribute_param=True)},
    # rank 0's weights win when ranks initialize differently
    {"id": "gpt-rankseed-pp2dp2-1F1B", "model": "gpt", "world": 4, "rank_seed": True, "spy_moves": True,
     "cfg": _cfg(num_stages=2, num_micro_batches=2)},
    # ... and only this rank's stages are moved to its device (a spy on module/tensor moves)
    {"id": "gpt2-placement-pp2dp1-1F1B", "model": "gpt2", "world": 2, "rank_seed": True, "spy_moves": True,
     "cfg": _cfg(num_stages=2, num_micro_batches=2)},
    {"id": "llama-placement-pp2dp1-Interleaved", "model": "llama", "world": 2, "rank_seed": True,
     "spy_moves": True, "cfg": _cfg(num_stages=2, num_micro_batches=2, schedule="Interleaved1F1B",
                                    stages_per_rank=2)},
    {"id": "llama-rankseed-pp1dp2-ddp", "model": "llama", "world": 2, "rank_seed": True, "eval": True,
     "cfg": _cfg(num_stages=1, num_micro_batches=2)},
    # dropout on: only checks that it trains (the loss on one repeated batch goes down)
    {"id": "gpt-dropout-pp2dp1-1F1B", "model": "gpt", "world": 2, "dropout": True, "steps": 5, "same_batch": True,
     "cfg": _cfg(num_stages=2, num_micro_batches=2)},
]

COVER_CASES = [combo_case(c) for c in covering_combos()]
CI_CASES = COVER_CASES + FEATURE_CASES
register("runtime", CI_CASES)  # one launch per world size, shared with other files' cases of this group


def _check(case: dict, got: dict) -> None:
    cfg = ParallelConfig.from_dict(case["cfg"])
    batch = cfg.global_batch(case["world"])
    ref = reference_run(case, batch)
    assert list(got["state"]) == list(ref["state"]), "full_state_dict names differ from the model's state_dict"
    assert got["loss_spread"] == 0.0, "train_step returned different losses on different ranks"
    build_model(case["model"], 1).load_state_dict(got["state"], strict=True)  # loads into the original class
    if case.get("dropout"):
        assert all(math.isfinite(x) for x in got["losses"])
        assert got["losses"][-1] < got["losses"][0], f"dropout run does not train: {got['losses']}"
        return
    if cfg.mixed_precision:
        lr = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"]))
        nr = max(abs(a - b) / abs(b) for a, b in zip(got["grad_norms"], ref["grad_norms"]))
        ur = update_rel_error(got["state"], ref["state"], ref["init"])
        assert lr <= 2e-3 and nr <= 5e-2 and ur <= 0.15, f"bf16 bounds: loss {lr:.2e} norm {nr:.2e} update {ur:.2e}"
    else:
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]),
                                   rtol=1e-4, atol=1e-5)
        for k, v in ref["state"].items():
            torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    if case.get("eval"):  # eval-mode loss of a held-out batch after training
        torch.testing.assert_close(got["eval_loss"], ref["eval_loss"], rtol=1e-4, atol=1e-5)
    if case.get("spy_moves"):  # parameters of another pp rank's stages are never moved; this rank's are
        assert got["foreign_min"] > 0, "every rank should have parameters it does not keep"
        assert got["own_moved_min"] > 0, "the spy saw no move of this rank's own stage parameters"
        assert got["foreign_moved"] == 0, f"{got['foreign_moved']} parameters/buffers of other ranks' stages moved"
    if case.get("frozen"):
        assert got["frozen_state"] == 0, "frozen parameters got optimizer state"
        frozen = [k for k in ref["state"] if k.startswith(FROZEN_PREFIX[case["model"]])]
        assert frozen
        for k in frozen:
            assert torch.equal(got["state"][k], ref["init"][k]), f"frozen {k} changed"


@pytest.mark.parametrize("case", CI_CASES, ids=[c["id"] for c in CI_CASES])
def test_equivalent_to_single_process(case):
    got = shared_results("runtime", case["world"])[case["id"]]
    _check(case, got)


@pytest.mark.full
@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_valid_combination(world):
    cases = [c for c in (combo_case(x) for x in all_valid_combos()) if c["world"] == world]
    results = shared_results("full", world, cases, timeout=max(600, 60 + 3 * len(cases)))
    failures = []
    for case in cases:
        try:
            _check(case, results[case["id"]])
        except AssertionError as exc:
            failures.append(f"{case['id']}: {str(exc)[:300]}")
    assert not failures, f"{len(failures)}/{len(cases)} combinations differ:\n" + "\n".join(failures)


def test_crashing_rank_ends_the_run_with_its_exception():
    case = {"id": "crash", "model": "gpt", "world": 2, "crash": 1, "cfg": _cfg(num_stages=2, num_micro_batches=2)}
    t0 = time.time()
    res = launch(2, [case], timeout=90)
    took = time.time() - t0
    assert res.results is None and any(rc != 0 for rc in res.returncodes)
    assert took < 60, f"the run took {took:.1f}s to end after a rank failed"
    assert "injected failure in forward (crash test)" in res.output
    assert "rank 1" in res.output
