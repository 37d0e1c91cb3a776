# Deferred .cuda(): waits for engagement, except in a script that created its own process group (it will run as written).
import pytest
import torch.distributed as dist
from torch import nn

import moreh_ap.oneline.patches as patches
from moreh_ap.oneline.state import STATE
from moreh_ap.option import disable_advanced_parallelization, enable_advanced_parallelization

pytestmark = pytest.mark.timeout(60)

ORIGINAL_TO, ORIGINAL_CUDA = nn.Module.to, nn.Module.cuda


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA "available" and the real move recorded instead of made (no GPU here)."""
    moved = []
    enable_advanced_parallelization()
    try:
        with monkeypatch.context() as m:  # undone BEFORE disable, which puts the saved originals back into torch
            m.setattr(patches, "cuda_available", lambda: True)
            m.setitem(STATE.originals, "module_cuda", lambda mod, device=None: moved.append(mod) or mod)
            m.setitem(STATE.originals, "module_to", lambda mod, *a, **k: moved.append(mod) or mod)
            yield moved
    finally:
        disable_advanced_parallelization()


def test_cuda_of_a_trainable_model_waits_for_engagement(fake_cuda):
    model = nn.Linear(2, 2)
    assert model.cuda() is model and model.to("cuda") is model
    assert fake_cuda == [] and model in STATE.deferred
    frozen = nn.Linear(2, 2).requires_grad_(False)
    frozen.cuda()
    assert fake_cuda == [frozen]  # nothing to split: moved at once


def test_cuda_moves_at_once_when_the_script_created_its_own_process_group(fake_cuda, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Linear(2, 2)
        model.cuda()
        model.to("cuda")
        assert fake_cuda == [model, model] and model not in STATE.deferred  # DDP(model) will wrap a moved model
    finally:
        dist.destroy_process_group()


def test_torch_is_restored_after_the_fake():
    assert nn.Module.to is ORIGINAL_TO and nn.Module.cuda is ORIGINAL_CUDA
