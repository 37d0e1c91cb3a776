# Which device a rank runs on (MOREH_AP_DEVICE, fake CUDA availability) and inputs moved to it by train_step.
import pytest
import torch
from torch import nn

import moreh_ap.runtime.engine as engine
from moreh_ap.config import ParallelConfig
from moreh_ap.runtime import parallelize
from moreh_ap.runtime.dist import device_for_rank
from moreh_ap.runtime.steps import to_device
from tests.helpers.models import mlp


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two CUDA devices as far as torch.cuda.is_available / device_count tell (no kernel ever runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("prefix", ["", "MOREH_AP_"])
def test_auto_is_cuda_local_rank_on_a_cuda_machine(fake_cuda, monkeypatch, prefix):
    """The local rank is torchrun's LOCAL_RANK or the self-launcher's MOREH_AP_LOCAL_RANK."""
    monkeypatch.delenv("MOREH_AP_DEVICE", raising=False)
    monkeypatch.setenv(prefix + "RANK", "3")
    monkeypatch.setenv(prefix + "WORLD_SIZE", "4")
    monkeypatch.setenv(prefix + "LOCAL_RANK", "3")
    assert device_for_rank() == torch.device("cuda", 1)
    monkeypatch.setenv("MOREH_AP_DEVICE", "cuda")
    assert device_for_rank() == torch.device("cuda", 1)


def test_moreh_ap_device_cpu_keeps_ranks_on_cpu_on_a_cuda_machine(fake_cuda, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MOREH_AP_DEVICE", "cpu")
    assert device_for_rank() == torch.device("cpu")


def test_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("MOREH_AP_DEVICE", raising=False)
    assert device_for_rank() == torch.device("cpu")
    monkeypatch.setenv("MOREH_AP_DEVICE", "cuda")
    with pytest.raises(ValueError, match="MOREH_AP_DEVICE=cuda but no CUDA device"):
        device_for_rank()


def test_bad_value_names_the_variable_and_choices(monkeypatch):
    monkeypatch.setenv("MOREH_AP_DEVICE", "tpu")
    with pytest.raises(ValueError, match=r"MOREH_AP_DEVICE='tpu' is not valid: expected one of \('cpu', 'cuda'\)"):
        device_for_rank()


def test_to_device_moves_every_tensor_in_nested_inputs():
    meta = torch.device("meta")
    out = to_device(({"a": torch.ones(2), "b": [torch.zeros(1), 3]}, "x", (torch.ones(1),)), meta)
    assert out[0]["a"].device == meta and out[0]["b"][0].device == meta and out[0]["b"][1] == 3
    assert out[1] == "x" and out[2][0].device == meta
    t = torch.ones(1)
    assert to_device(t, torch.device("cpu")) is t  # already there: not copied


def test_train_step_and_eval_move_cpu_inputs_to_the_rank_device(monkeypatch):
    """The rank's device is 'meta' here (a device that is not the inputs'): without the move, the CPU
    batch would meet meta weights and fail."""
    monkeypatch.setattr(engine, "device_for_rank", lambda: torch.device("meta"))
    model = mlp(width=8, depth=2)
    pm = parallelize(model, ParallelConfig(num_stages=1, num_micro_batches=2, batch_per_device=2,
                                           mixed_precision=False),
                     loss_fn=nn.functional.mse_loss, measure=False)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises((RuntimeError, NotImplementedError)):
        model(x)  # the module itself is on meta now: CPU inputs do not mix
    loss = pm.train_step(x, target=y)
    assert loss.device.type == "meta"
    pm.eval()
    with torch.no_grad():
        out = pm(x, target=y)
    assert out.loss.device.type == "meta"
