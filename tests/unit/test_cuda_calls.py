# A GPU script's CUDA calls on a CPU-only machine while AP is requested: accepted, everything stays on the CPU.
import pytest
import torch
from torch import nn

from moreh_ap.oneline.cuda_calls import cpu_instead_of_cuda
from moreh_ap.option import disable_advanced_parallelization, enable_advanced_parallelization

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only acceptance of CUDA calls")]

_ORIGINAL_TO = torch.Tensor.to
_ORIGINAL_SET_DEVICE = torch.cuda.set_device
_ORIGINAL_SYNC = torch.cuda.synchronize


def _calls_fail_as_in_plain_torch():
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1).to("cuda")
    with pytest.raises((AssertionError, RuntimeError, AttributeError)):
        torch.cuda.set_device(0)
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.synchronize()


def test_cpu_instead_of_cuda_replaces_only_the_device():
    assert cpu_instead_of_cuda(("cuda", torch.float16), {"non_blocking": True}) == (
        ("cpu", torch.float16), {"non_blocking": True})
    assert cpu_instead_of_cuda((torch.device("cuda", 1),), {}) == (("cpu",), {})
    assert cpu_instead_of_cuda((0,), {}) == (("cpu",), {})
    assert cpu_instead_of_cuda((), {"device": "cuda:0", "dtype": torch.float64}) == (
        (), {"device": "cpu", "dtype": torch.float64})
    for kept in [(torch.float64,), ("cpu",), (torch.ones(1),), (torch.float16, True)]:
        assert cpu_instead_of_cuda(kept, {}) == (kept, {})


@pytest.mark.parametrize("mode", ["on", "env-zero"])
def test_each_cuda_call_is_accepted_and_restored(mode, monkeypatch):
    if mode == "env-zero":  # AP requested but turned off: the script still runs as written on the CPU
        monkeypatch.setenv("MOREH_ENABLE_ADVANCED_PARALLELIZATION", "0")
    _calls_fail_as_in_plain_torch()
    enable_advanced_parallelization()
    torch.cuda.set_device(0)
    torch.cuda.set_device("cuda:0")
    torch.cuda.synchronize()
    torch.cuda.synchronize(torch.device("cuda", 0))
    torch.cuda.empty_cache()
    torch.cuda.manual_seed(1)
    torch.cuda.manual_seed_all(1)
    t = torch.arange(3.0)
    for args, kwargs in [(("cuda",), {}), ((torch.device("cuda", 0),), {"non_blocking": True}), ((0,), {}),
                         ((), {"device": "cuda"})]:
        moved = t.to(*args, **kwargs)
        assert moved.device.type == "cpu" and torch.equal(moved, t)
    assert t.to("cuda", torch.float64).dtype == torch.float64
    assert t.to("cuda", copy=True).data_ptr() != t.data_ptr()  # the other arguments keep their meaning
    lin = nn.Linear(2, 2)
    assert lin.to(0) is lin and lin.to(device="cuda:0") is lin and lin.weight.device.type == "cpu"
    assert lin.to(torch.device("cuda"), torch.float64).weight.dtype == torch.float64
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1, device="cuda")  # not accepted (documented)
    with pytest.raises(RuntimeError):
        torch.ones(1).pin_memory()  # not accepted (documented)
    disable_advanced_parallelization()
    assert torch.Tensor.to is _ORIGINAL_TO
    assert torch.cuda.set_device is _ORIGINAL_SET_DEVICE and torch.cuda.synchronize is _ORIGINAL_SYNC
    _calls_fail_as_in_plain_torch()


def test_patched_cuda_calls_keep_torch_compile_working():
    """torch.compile maps torch functions by object: the stand-ins must be one object per name."""
    from torch._dynamo import trace_rules

    enable_advanced_parallelization()
    try:
        assert torch.cuda.set_device is not torch.cuda.synchronize
        trace_rules.get_torch_obj_rule_map.__wrapped__()  # built fresh (the cached map may predate the patch)
    finally:
        disable_advanced_parallelization()
