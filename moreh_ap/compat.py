# Differences between the torch versions moreh_ap supports (2.11 and 2.13) that one code path cannot cover.
"""One function per difference, each naming the torch versions and what differs; the rest of moreh_ap calls
these and never reads ``torch.__version__`` itself.

(The differences that one code path covers are handled where they occur: a pipeline schedule gets positional
inputs on the rank of the first stage only, stages send floating-point activations only, and the memory
trackers of ``moreh_ap.runtime.memtrack`` leave out the fake tensors of DTensor's sharding propagation, which
torch 2.11's ``MemTracker`` counts.)
"""
from __future__ import annotations

import functools

import torch

__all__ = ["all_gather_autograd", "contiguous_uneven_gathers"]


def _before(major: int, minor: int) -> bool:
    return torch.torch_version.TorchVersion(torch.__version__) < (major, minor)


@functools.cache
def contiguous_uneven_gathers() -> bool:
    """Make a DTensor all-gathered from uneven shards hold a contiguous local tensor, as torch 2.13 does.

    torch 2.13's ``Shard._maybe_unpad_tensor`` ends with ``.contiguous()``; torch 2.11's does not, so the cut of
    a padded all-gather on a non-leading dimension (a sequence of 9 positions over tp 2, gathered from
    sequence-parallel shards, in the forward or for a gradient in the backward) stays non-contiguous behind
    contiguous global strides, and the next linear's ``view`` fails ("view size is not compatible with input
    tensor's size and stride"). Before torch 2.13 this wraps that method to copy such a cut (what 2.13 does);
    from 2.13 on it changes nothing. Idempotent.

    Returns:
        True when the wrapper was installed (torch < 2.13).
    """
    if not _before(2, 13):
        return False
    from torch.distributed.tensor.placement_types import Shard

    unpad = Shard._maybe_unpad_tensor

    @functools.wraps(unpad)
    def _maybe_unpad_tensor(self, local_tensor, logical_dim_size, num_chunks):
        out = unpad(self, local_tensor, logical_dim_size, num_chunks)
        if isinstance(out, torch.Tensor) and not out.is_contiguous():
            out = out.contiguous()
        return out

    Shard._maybe_unpad_tensor = _maybe_unpad_tensor
    return True


def all_gather_autograd(tensor: torch.Tensor, group) -> torch.Tensor:
    """torch's autograd-aware all-gather of ``tensor`` on dim 0 over ``group`` (backward: a sum-reduce-scatter).

    torch 2.13 names it ``all_gather_single_autograd`` and deprecates 2.11's ``all_gather_tensor_autograd`` (and
    ``torch.distributed.nn.functional.all_gather``, which warned at every call); the newer name is used where
    it exists.
    """
    import torch.distributed._functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    return gather(tensor, 0, group)

