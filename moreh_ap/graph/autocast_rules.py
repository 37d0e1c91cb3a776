# CUDA's autocast rules on CPU tensors: trace what a bf16 autocast run on a GPU keeps, without a GPU.
"""Make CPU autocast cast like CUDA autocast does, for the duration of a trace.

Autocast decides, op by op, the dtype an op runs in, and the casts it makes are recorded by
autograd, so they decide the dtype (and the bytes) of every tensor saved for backward. The CPU and
CUDA op lists differ: on CUDA ``pow``, ``exp``, ``rsqrt``, ``softmax``, ``sum``, ``cumsum`` ... run
in float32, on the CPU they run in the input's (bf16) dtype. A model whose activation function is
written with such ops (GPT-2's ``gelu_new``: ``0.5 * x * (1 + tanh(c * (x + 0.044715 * pow(x, 3))))``)
therefore keeps float32 intermediates on a GPU where a CPU trace sees bf16 ones.

:func:`cuda_autocast_rules` registers, for the ``AutocastCPU`` dispatch key, kernels that apply
CUDA's policy to the ops whose CUDA policy differs from the CPU one, and removes them on exit. With
it, ``torch.autocast("cpu", dtype=torch.bfloat16)`` over fake CPU tensors produces the dtypes (and
saved tensors) a CUDA autocast run produces. The op lists follow torch's documented CUDA autocast
op reference ("CUDA Ops that can autocast to float32" / "to float16"); ops whose policy is the same
on both devices (matmuls, convolutions, losses) are left to torch.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Callable, Iterator

import torch

__all__ = ["CUDA_FP32_OPS", "CUDA_FP32_OPT_DTYPE_OPS", "CUDA_LOWER_PRECISION_OPS", "cuda_autocast_rules"]

CUDA_FP32_OPS = (
    "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "cosh", "tan", "acos", "asin", "erfinv", "softplus", "layer_norm",
    "group_norm", "cosine_similarity", "dist", "renorm", "logsumexp",
)
"""aten overloads CUDA autocast runs in float32 (inputs cast) and CPU autocast leaves alone."""

CUDA_FP32_OPT_DTYPE_OPS = ("softmax.int", "log_softmax.int", "cumsum", "cumprod", "sum", "sum.dim_IntList",
                           "prod", "linalg_vector_norm")
"""aten overloads CUDA autocast runs with ``dtype=float32`` unless the caller gave a dtype."""

CUDA_LOWER_PRECISION_OPS = ("addmv", "addr", "mv", "chain_matmul", "linalg_multi_dot")
"""aten overloads CUDA autocast runs in the low-precision dtype and CPU autocast does not."""

_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
_LOCK = threading.Lock()


def _op(name: str):
    packet, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, packet), overload or "default")


def _eligible(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def _cast_all(value: object, dtype: torch.dtype) -> object:
    if _eligible(value):
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_all(v, dtype) for v in value)
    return value


def _cast_kernel(op, dtype_of: Callable[[], torch.dtype]):
    def kernel(*args, **kwargs):
        dtype = dtype_of()
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            return op(*_cast_all(list(args), dtype), **{k: _cast_all(v, dtype) for k, v in kwargs.items()})

    return kernel


def _fp32_opt_dtype_kernel(op):
    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            if args and _eligible(args[0]) and kwargs.get("dtype") is None:
                schema_args = [a.name for a in op._schema.arguments]
                if "dtype" in schema_args:
                    kwargs = {**kwargs, "dtype": torch.float32}
            return op(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_rules() -> Iterator[None]:
    """While active, CPU autocast casts the way CUDA autocast does (see the module docstring).

    Process-wide (dispatcher registrations are global): hold it only around a trace. Nested or
    concurrent uses are serialized.
    """
    with _LOCK:
        lib = torch.library.Library("aten", "IMPL")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
                for name in CUDA_FP32_OPS:
                    lib.impl(name, _cast_kernel(_op(name), lambda: torch.float32), "AutocastCPU")
                for name in CUDA_FP32_OPT_DTYPE_OPS:
                    lib.impl(name, _fp32_opt_dtype_kernel(_op(name)), "AutocastCPU")
                for name in CUDA_LOWER_PRECISION_OPS:
                    lib.impl(name, _cast_kernel(_op(name), lambda: torch.get_autocast_dtype("cpu")), "AutocastCPU")
            yield
        finally:
            lib._destroy()
