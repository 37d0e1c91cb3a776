# O1's process-wide fp32 loss functions: fp16 inputs of torch.nn.functional's losses are cast to fp32, as apex's O1 did.
"""Why: O1 autocasts only the models' forwards, but training loops compute the loss
outside the forward (``loss = F.mse_loss(model(x), y)``). There the fp16 output meets
an fp32 target, and torch's backward of several losses rejects the mix ("Found dtype
Float but expected Half": ``mse_loss`` on torch <= 2.11, ``huber_loss`` and
``binary_cross_entropy`` on 2.13 too). apex's O1 patched torch process-wide and ran
every loss in fp32; this module does the same for the losses only: while O1 is the
active level, each loss function below casts its fp16 tensor arguments to fp32 before
running (bf16 and fp32 tensors are left alone). ``nn.MSELoss`` and friends call these
functions, so the loss modules are covered as well.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F

# torch.nn.functional's losses (apex's O1 ran its losses in fp32; huber, gaussian_nll and
# binary_cross_entropy are later or were banned there, and are cast here too).
LOSS_FUNCTIONS = (
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cosine_embedding_loss",
    "cross_entropy",
    "ctc_loss",
    "gaussian_nll_loss",
    "hinge_embedding_loss",
    "huber_loss",
    "kl_div",
    "l1_loss",
    "margin_ranking_loss",
    "mse_loss",
    "multi_margin_loss",
    "multilabel_margin_loss",
    "multilabel_soft_margin_loss",
    "nll_loss",
    "poisson_nll_loss",
    "smooth_l1_loss",
    "soft_margin_loss",
    "triplet_margin_loss",
)

_ORIGINALS: dict[str, Callable[..., Any]] = {}


def _fp16_to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype == torch.float16:
        return value.float()
    return value


def _in_fp32(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def loss(*args: Any, **kwargs: Any) -> Any:
        args = tuple(_fp16_to_fp32(a) for a in args)
        kwargs = {k: _fp16_to_fp32(v) for k, v in kwargs.items()}
        return fn(*args, **kwargs)

    loss.__moreh_amp_original__ = fn  # type: ignore[attr-defined]
    return loss


def install() -> None:
    """Make ``torch.nn.functional``'s losses cast fp16 arguments to fp32 (idempotent)."""
    for name in LOSS_FUNCTIONS:
        if name in _ORIGINALS or not hasattr(F, name):
            continue
        _ORIGINALS[name] = getattr(F, name)
        setattr(F, name, _in_fp32(_ORIGINALS[name]))


def uninstall() -> None:
    """Put torch's own loss functions back (a level other than O1 was initialized)."""
    for name, fn in _ORIGINALS.items():
        setattr(F, name, fn)
    _ORIGINALS.clear()


def installed() -> bool:
    """Whether the fp32 loss functions are in place."""
    return bool(_ORIGINALS)
