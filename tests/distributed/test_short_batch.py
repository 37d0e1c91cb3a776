# A short last batch that dp does not divide trains as one device would (2 gloo ranks vs one process).
"""Each case trains 3 AdamW steps (fp32) whose last global batch has an odd number of samples on dp 2:
Hugging Face models called with ``labels=`` get padding rows whose labels are all -100; ``loss_fn``
models at pp = 1 get an uneven split weighted by samples. Losses, global grad norms and every final
weight match the single-process run with ``assert_close(rtol=1e-4, atol=1e-5)`` (the tolerance of the
runtime equivalence tests; a dropped or double-counted row moves the loss by > 1e-2).
"""
from __future__ import annotations

import pytest
import torch

from moreh_ap.config import ParallelConfig
from tests.helpers.dist_harness import register, shared_results
from tests.helpers.runtime_cases import reference_run

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(900)]


def _cfg(**kw) -> dict:
    return ParallelConfig(**{"batch_per_device": 2, "mixed_precision": False, "num_stages": 1, **kw}).to_dict()


CASES = [
    {"id": "llama-labels-dp2-ddp-short3", "model": "llama", "world": 2, "padding": True, "short_last": 3,
     "cfg": _cfg(num_micro_batches=2)},
    {"id": "gpt2-labels-dp2-fsdp-short3", "model": "gpt2", "world": 2, "hf_style": True, "short_last": 3,
     "cfg": _cfg(num_micro_batches=1, distribute_param=True)},
    {"id": "gpt-lossfn-dp2-ddp-short3", "model": "gpt", "world": 2, "short_last": 3,
     "cfg": _cfg(num_micro_batches=2)},
    {"id": "mlp-lossfn-dp2-fsdp-short5", "model": "mlp", "world": 2, "short_last": 5,
     "cfg": _cfg(num_micro_batches=2, distribute_param=True)},
]
register("runtime", CASES)  # in the runtime equivalence tests' 2-rank launch (one start-up for both files)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_short_last_batch_matches_one_device(case):
    got = shared_results("runtime", case["world"])[case["id"]]
    ref = reference_run(case, ParallelConfig.from_dict(case["cfg"]).global_batch(case["world"]))
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=1e-5)
    for k, v in ref["state"].items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert got["loss_spread"] == 0.0
