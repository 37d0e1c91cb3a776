# The generic family (blocks, no pipeline split) on 2 gloo ranks: ZeRO-3 + recompute per block == one device.
from __future__ import annotations

import pytest
import torch

import moreh_ap
from moreh_ap.config import ParallelConfig
from tests.helpers.dist_harness import register, shared_results
from tests.helpers.models import tiny_neox

pytestmark = pytest.mark.multirank

NEOX_STEPS = 2


def _neox_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (4, 16), generator=g) for _ in range(NEOX_STEPS)]


def neox_fsdp_run(case: dict, world: int, rank: int) -> dict:
    """Runner for ``tests.helpers.dist_harness.launch``: the tiny GPT-NeoX trained with ZeRO-3 and recompute at pp = 1."""
    model = tiny_neox(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    pm = moreh_ap.parallelize(model, ParallelConfig.from_dict(case["cfg"]), optimizer=opt)
    from torch.distributed.fsdp import FSDPModule

    blocks = list(model.gpt_neox.layers.children())  # per block, as the planner costs it
    wrapped = all(isinstance(b, FSDPModule) and "CheckpointWrapper" in type(b).__name__ for b in blocks)
    losses = []
    for ids in _neox_batches():
        losses.append(float(pm.train_step(input_ids=ids, labels=ids).detach()))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"losses": losses, "state": pm.full_state_dict(), "wrapped": wrapped}


CFG = ParallelConfig(num_stages=1, num_micro_batches=2, batch_per_device=1, recomputation=True,
                     distribute_param=True, distribute_low_prec_param=True, mixed_precision=False)
register("runtime", [{"id": "neox", "runner": "tests.distributed.test_generic_family:neox_fsdp_run", "world": 2,
                      "cfg": CFG.to_dict()}])  # in the runtime equivalence tests' 2-rank launch


@pytest.mark.multirank
@pytest.mark.timeout(900)  # it may be the test that waits for the shared launch
def test_generic_model_trains_like_one_device_with_fsdp_per_block_on_two_ranks():
    got = shared_results("runtime", 2)["neox"]
    model = tiny_neox(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref = []
    for ids in _neox_batches():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref.append(float(loss.detach()))
    assert got["wrapped"]
    assert got["losses"] == pytest.approx(ref, rel=1e-4, abs=1e-5)
    state = model.state_dict()
    assert set(got["state"]) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-5)
