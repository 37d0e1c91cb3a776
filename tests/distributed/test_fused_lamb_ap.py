# FusedLAMB under moreh_ap.parallelize: 2 gloo CPU ranks (pp=2; dp=2 with FSDP2 shards) vs one process.
"""FusedLAMB's global grad norm (clipping) and the trust ratio's ||p|| / ||update|| must be those of the
whole model even when each rank holds one pipeline stage or one shard of every parameter. Each case
trains 4 FusedLAMB steps (lr 1e-2, weight decay 0.01 so every parameter gets a trust ratio, and a
max_grad_norm below the model's grad norm so that clipping by the GLOBAL norm acts on every step)
through ``moreh_ap.parallelize`` and is compared with single-process FusedLAMB on the same batches:
fp32 losses of every step, grad norms and every final weight with ``assert_close(rtol=1e-4, atol=1e-5)``.
All cases run in ONE launch of 2 ranks (the runtime group's: ``dist_harness.register``).
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers.dist_harness import register, shared_results
from tests.helpers.runtime_cases import reference_run
from moreh_ap.config import ParallelConfig

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(900)]  # the first test waits for the shared launch

MAX_GRAD_NORM = 0.5


def _case(cid: str, model: str, *, lamb: dict | None = None, **cfg) -> dict:
    cfg.setdefault("batch_per_device", 2)
    cfg.setdefault("mixed_precision", False)
    return {"id": cid, "model": model, "world": 2, "steps": 4, "optim": "lamb",
            "lamb": {"max_grad_norm": MAX_GRAD_NORM, **(lamb or {})}, "cfg": ParallelConfig(**cfg).to_dict()}


CASES = [
    # pipeline: the global norm sums both stages; GPT-2's wte/lm_head tie lives on both ranks (counted once)
    _case("gpt2-pp2-1F1B", "gpt2", num_stages=2, num_micro_batches=2),
    _case("gpt-pp2-GPipe-nvlamb", "gpt", num_stages=2, num_micro_batches=2, schedule="GPipe",
          lamb={"use_nvlamb": True, "weight_decay": 0.0}),
    # FSDP2: every parameter is a DTensor shard; ||p|| and ||u|| must be of the whole parameter
    _case("llama-dp2-fsdp", "llama", num_stages=1, num_micro_batches=1, distribute_param=True),
    _case("gpt-dp2-fsdp-mb2", "gpt", num_stages=1, num_micro_batches=2, distribute_param=True),
]
register("runtime", CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_fused_lamb_under_ap_matches_one_process(case):
    got = shared_results("runtime", case["world"])[case["id"]]
    ref = reference_run(case, ParallelConfig.from_dict(case["cfg"]).global_batch(case["world"]))
    # clipping by the global norm is exercised on every step (a per-rank norm would clip differently)
    assert min(ref["grad_norms"]) > MAX_GRAD_NORM, ref["grad_norms"]
    assert got["loss_spread"] == 0.0
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=1e-5)
    moved = max(float((v - ref["init"][k]).abs().max()) for k, v in ref["state"].items())
    assert moved > 1e-3, "the reference did not train"
    for k, v in ref["state"].items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
