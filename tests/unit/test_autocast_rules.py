# CUDA autocast rules emulated on CPU tensors: dtypes as CUDA gives them, saved bytes, and a clean exit.
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from moreh_ap.graph.autocast_rules import cuda_autocast_rules


def _dtypes(x: torch.Tensor) -> dict[str, torch.dtype]:
    y = x @ x.T  # bf16 under autocast on both devices
    return {"matmul": y.dtype, "pow": torch.pow(y, 3.0).dtype, "softmax": torch.softmax(y, -1).dtype,
            "sum": y.sum().dtype, "rsqrt": torch.rsqrt(y).dtype, "exp": torch.exp(y).dtype,
            "layer_norm": torch.nn.functional.layer_norm(y, (y.shape[-1],)).dtype, "tanh": torch.tanh(y).dtype}


def test_cuda_rules_cast_like_cuda_and_are_removed_on_exit():
    x = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = _dtypes(x)
        with cuda_autocast_rules():
            cuda = _dtypes(x)
        after = _dtypes(x)
    assert before == after
    assert before["pow"] == torch.bfloat16 and before["softmax"] == torch.bfloat16
    # CUDA autocast: matmuls in bf16, these in float32; tanh is on neither list (runs in its input's dtype)
    assert cuda["matmul"] == torch.bfloat16 and cuda["tanh"] == torch.bfloat16
    for op in ("pow", "softmax", "sum", "rsqrt", "exp", "layer_norm"):
        assert cuda[op] == torch.float32, op


def _saved_bytes(module: torch.nn.Module, *, cuda: bool) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with FakeTensorMode(allow_non_fake_inputs=True):
        h = torch.empty(2, 16, 64, requires_grad=True)
        rules = cuda_autocast_rules() if cuda else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        with rules, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            module(h)
    return total


def test_gelu_new_keeps_float32_intermediates_under_cuda_rules():
    """GPT-2's MLP (gelu_new written with pow/tanh): CUDA keeps fp32 pieces of the activation."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    mlp = GPT2MLP(256, GPT2Config(n_embd=64, n_head=4, n_layer=1, activation_function="gelu_new"))
    cpu, cuda = _saved_bytes(mlp, cuda=False), _saved_bytes(mlp, cuda=True)
    tokens, inner = 2 * 16, 256
    # at least the pow input (x cast to fp32) and the fp32 gelu output cast for c_proj are extra
    assert cuda - cpu >= tokens * inner * 2 * 2, (cpu, cuda)


def test_plain_linear_unchanged():
    lin = torch.nn.Linear(64, 64)
    assert _saved_bytes(lin, cuda=False) == _saved_bytes(lin, cuda=True)
