# FusedLAMB: apex.optimizers.FusedLAMB's math (global grad-norm clipping + LAMB trust ratio) on torch._foreach_*.
"""``moreh_ap.optim.FusedLAMB`` — a drop-in for ``apex.optimizers.FusedLAMB``.

Also reachable as ``torch.moreh.FusedLAMB`` and ``torch.ops.moreh.FusedLAMB``
(the spelling of the MoAI guide)::

    opt = torch.ops.moreh.FusedLAMB(model.parameters(), lr=1e-3)

The math is apex's (``csrc/multi_tensor_lamb.cu``), step by step:

1. one global L2 norm of all gradients of all groups, before any update;
   ``clip = gnorm / max_grad_norm`` if ``gnorm > max_grad_norm`` else 1
   (``max_grad_norm`` is the constructor's value; a per-group value is ignored,
   as in apex; ``float('inf')`` disables clipping, 0 zeroes the gradients);
2. per group, ``group['step'] += 1`` (also for a group without gradients);
3. per parameter, with ``g = grad / clip``: Adam moments (``grad_averaging``
   chooses ``1 - beta1`` or 1 as the gradient's weight in ``m``), the
   bias-corrected update ``u``, decoupled weight decay added to ``u``
   (``adam_w_mode=True``) or L2 decay added to ``g`` (``adam_w_mode=False``);
4. trust ratio ``lr * ||p|| / ||u||`` (``lr`` if either norm is 0) when
   ``use_nvlamb`` or the group's ``weight_decay != 0``, else ``lr``; no clamp;
5. ``p -= ratio * u``. As in apex, ``p.grad`` is overwritten with ``u``.

Deviations from apex, on purpose:

* bf16 parameters are accepted (apex: fp16 and fp32 only);
* the moments of fp16 and bf16 parameters are kept in fp32 (apex keeps them in
  the parameter's dtype, which loses the small ``(1-beta2)*g**2`` increments);
  the arithmetic is fp32 for every dtype, as in apex's kernel, and the update
  norm is taken of the fp32 update (apex: of the update rounded to fp16).
  ``load_state_dict`` keeps those moments in fp32 (torch's default would cast
  them to the parameter's dtype);
* bad hyper-parameters (negative ``lr``, ``eps``, ``weight_decay`` or
  ``max_grad_norm``; betas outside [0, 1)) raise ``ValueError``.

Under ``moreh_ap.parallelize`` (or any DTensor parameters) the norms cover the
whole model, as on one device: :meth:`FusedLAMB.global_grad_norm` spans all
pipeline stages and shards (a multi-rank ParallelModel that rebinds this
optimizer gives it its grad-norm function through :meth:`FusedLAMB.set_grad_norm_fn`;
tied copies counted once), and :meth:`FusedLAMB.per_tensor_norms` gives ``||p||``
and ``||u||`` of the whole parameter for a DTensor (FSDP2) shard; the rest of
the update runs on the local shards. ``step()`` is then a collective: every
rank calls it. The norm code itself is :mod:`moreh_ap.optim.norms`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Callable

import torch

from moreh_ap.optim.norms import is_dtensor, local_shard, per_tensor_norms, total_norm

__all__ = ["FusedLAMB", "GradNormFn"]

GradNormFn = Callable[[list[torch.Tensor]], "torch.Tensor | None"]
"""``fn(params) -> norm``: the global 2-norm of the gradients of ``params`` over every rank that holds a
share of the model (a collective), or None when ``params`` are not the model's (the local norm is used)."""

_FLOAT32 = torch.float32
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _clip_on_host(clip: torch.Tensor) -> bool:
    """Read the clip factor on the host? Yes on CPU (no device to wait for); no on accelerators."""
    return clip.device.type == "cpu"


# Elements per multi-tensor launch on CPU. Every op of the update is per tensor after the global
# norm, so the tensors are taken a cache-sized chunk at a time: the ~12 passes of the update then
# read the chunk from cache instead of streaming the whole model from memory each pass (like
# apex's multi_tensor_apply, which also works chunk by chunk). On accelerators: all at once.
CPU_CHUNK_NUMEL = 1 << 16


def _chunk_numel(device: torch.device) -> int | None:
    return CPU_CHUNK_NUMEL if device.type == "cpu" else None


def _chunks(tensors: list[torch.Tensor], budget: int | None) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) ranges of ``tensors`` with at most ``budget`` elements each (>= 1 tensor)."""
    if budget is None:
        return [(0, len(tensors))]
    ranges, lo, total = [], 0, 0
    for i, t in enumerate(tensors):
        n = t.numel()
        if i > lo and total + n > budget:
            ranges.append((lo, i))
            lo, total = i, 0
        total += n
    ranges.append((lo, len(tensors)))
    return ranges


def _check_hyper(name: str, value: float, *, upper: float | None = None) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"FusedLAMB: {name}={value!r} is not valid: expected a number")
    if value < 0 or (upper is not None and value >= upper):
        accepted = f"0 <= {name} < {upper}" if upper is not None else f"{name} >= 0"
        raise ValueError(f"FusedLAMB: {name}={value!r} is not valid: expected {accepted}")


class FusedLAMB(torch.optim.Optimizer):
    """LAMB with apex's semantics (global grad-norm clipping, NVLAMB toggle).

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate (default 1e-3).
        bias_correction: apply Adam's bias correction (default True).
        betas: coefficients of the running averages of the gradient and its
            square (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-6; apex's docstring wrongly
            says 1e-8).
        weight_decay: decoupled (``adam_w_mode``) or L2 weight decay
            (default 0.01; apex's docstring wrongly says 0).
        amsgrad: not supported; True raises ``RuntimeError`` as in apex.
        adam_w_mode: decoupled weight decay (True) or L2 regularization (False).
        grad_averaging: weight the gradient by ``1 - beta1`` in the first
            moment (True) or by 1 (False).
        set_grad_none: ``zero_grad()`` sets gradients to None (default True).
        max_grad_norm: global gradient-norm clipping threshold over all groups
            (default 1.0; ``float('inf')`` disables clipping).
        use_nvlamb: apply the trust ratio also to parameters whose group has
            ``weight_decay == 0`` (default False).
        grad_norm_fn: the global gradient norm over all ranks (see :data:`GradNormFn`; default None:
            the norm of this process's gradients). ``moreh_ap.parallelize`` sets it through
            :meth:`set_grad_norm_fn` when it rebinds this optimizer on several ranks.

    Raises:
        RuntimeError: ``amsgrad=True``; at ``step()``, a sparse gradient or a
            parameter that is not fp32, fp16 or bf16.
        ValueError / TypeError: an invalid hyper-parameter.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        amsgrad: bool = False,
        adam_w_mode: bool = True,
        grad_averaging: bool = True,
        set_grad_none: bool = True,
        max_grad_norm: float = 1.0,
        use_nvlamb: bool = False,
        *,
        grad_norm_fn: GradNormFn | None = None,
    ) -> None:
        if amsgrad:
            raise RuntimeError("FusedLAMB does not support the AMSGrad variant.")
        _check_hyper("lr", lr)
        _check_hyper("eps", eps)
        _check_hyper("weight_decay", weight_decay)
        _check_hyper("max_grad_norm", max_grad_norm)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"FusedLAMB: betas={betas!r} is not valid: expected a pair (beta1, beta2)")
        _check_hyper("betas[0]", betas[0], upper=1.0)
        _check_hyper("betas[1]", betas[1], upper=1.0)
        defaults = dict(
            lr=lr,
            bias_correction=bias_correction,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm,
        )
        super().__init__(params, defaults)
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.set_grad_none = set_grad_none
        self.use_nvlamb = use_nvlamb
        self.grad_norm_fn = grad_norm_fn

    # -- norms (global over ranks for sharded / pipelined models) ------------------------------------
    def set_grad_norm_fn(self, fn: GradNormFn | None) -> None:
        """Take the global gradient norm from ``fn`` from now on (None: this process's gradients only).

        ``moreh_ap.parallelize`` calls it with the model's norm over all pipeline stages and shards.
        """
        if fn is not None and not callable(fn):
            raise TypeError(f"FusedLAMB.set_grad_norm_fn: expected a callable or None, got {type(fn).__name__}")
        self.grad_norm_fn = fn

    def global_grad_norm(self, grads: list[torch.Tensor], *, params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Global L2 norm of ``grads`` (0-dim fp32 tensor), the grads of ``params``.

        With a grad-norm function (:meth:`set_grad_norm_fn`) the norm spans the whole model (all
        pipeline stages and shards, tied copies once; a collective: every rank steps); otherwise
        :func:`~moreh_ap.optim.norms.total_norm` of ``grads``.
        """
        if self.grad_norm_fn is not None and params is not None:
            norm = self.grad_norm_fn(params)
            if norm is not None:
                return norm
        return total_norm(grads)

    def per_tensor_norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """L2 norm of each tensor (1-D fp32 tensor), of the whole tensor for a DTensor shard
        (:func:`~moreh_ap.optim.norms.per_tensor_norms`)."""
        return per_tensor_norms(tensors)

    # -- torch.optim.Optimizer API ------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Set gradients to None (``set_grad_none``, the default) or to zero."""
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else set_to_none)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Standard load; the moments of fp16/bf16 parameters stay fp32 (torch would cast them)."""
        saved_state = state_dict["state"]
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(saved_ids, params):
            if p.dtype == _FLOAT32 or pid not in saved_state:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                value = saved_state[pid].get(key)
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(dtype=_FLOAT32, device=p.device, copy=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LAMB step over all groups; returns ``closure()``'s value if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [self._gather(group) for group in self.param_groups]
        all_params = [p for gathered in groups for bucket in gathered.values() for p in bucket[0]]
        all_grads = [g for gathered in groups for bucket in gathered.values() for g in bucket[1]]
        clip = self._clip_factor(all_grads, all_params)
        for group, gathered in zip(self.param_groups, groups):
            group["step"] = group.get("step", 0) + 1
            for (is_fp32, _device), (params, grads, exp_avgs, exp_avg_sqs) in gathered.items():
                for lo, hi in _chunks(params, _chunk_numel(params[0].device)):
                    self._update_bucket(group, params[lo:hi], grads[lo:hi], exp_avgs[lo:hi], exp_avg_sqs[lo:hi],
                                        clip=clip, is_fp32=is_fp32)
        return loss

    # -- internals ----------------------------------------------------------------------------------
    def _gather(self, group: dict[str, Any]) -> dict[tuple[bool, torch.device], tuple[list, list, list, list]]:
        """Params with a grad, their grads and moments, bucketed by (is fp32, device); inits state."""
        buckets: dict[tuple[bool, torch.device], tuple[list, list, list, list]] = {}
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("FusedLAMB does not support sparse gradients, please consider SparseAdam instead")
            if p.dtype not in _SUPPORTED:
                raise RuntimeError(f"FusedLAMB only support fp16, bf16 and fp32 (got a {p.dtype} parameter).")
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, dtype=_FLOAT32, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=_FLOAT32, memory_format=torch.preserve_format)
            bucket = buckets.setdefault((p.dtype == _FLOAT32, p.device), ([], [], [], []))
            bucket[0].append(p)
            bucket[1].append(grad)
            bucket[2].append(state["exp_avg"])
            bucket[3].append(state["exp_avg_sq"])
        return buckets

    def _clip_factor(self, grads: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
        """``gnorm / max_grad_norm`` where ``gnorm > max_grad_norm``, else 1 (NaN: 1, as apex)."""
        gnorm = self.global_grad_norm(grads, params=params)
        max_norm = float(self.defaults["max_grad_norm"])
        one = torch.ones((), dtype=_FLOAT32, device=gnorm.device)
        return torch.where(gnorm > max_norm, gnorm / max_norm, one)

    def _update_bucket(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        *,
        clip: torch.Tensor,
        is_fp32: bool,
    ) -> None:
        """apex's LAMB stage 1 (moments, update) and stage 2 (trust ratio, apply) on one bucket."""
        beta1, beta2 = group["betas"]
        step, lr, eps, wd = group["step"], group["lr"], group["eps"], group["weight_decay"]
        bc1, bc2 = (1 - beta1**step, 1 - beta2**step) if group["bias_correction"] else (1.0, 1.0)
        # fp32 params are updated in place and their grads become the update buffer (as apex);
        # fp16/bf16 params are computed on fp32 copies and written back.
        p32 = params if is_fp32 else [p.float() for p in params]
        g32 = grads if is_fp32 else [g.float() for g in grads]
        # DTensor (FSDP2) parameters: the math runs on the local shards (views), only the two norms
        # of the trust ratio see the DTensors, so that they are norms of the whole parameters.
        p_whole, u_whole = p32, g32
        if any(is_dtensor(p) for p in params):
            params, grads, p32, g32, exp_avgs, exp_avg_sqs = (
                [local_shard(t) for t in ts] for ts in (params, grads, p32, g32, exp_avgs, exp_avg_sqs))
        # g <- g / clip. On CPU the factor is read on the host (free there): a Python scalar is
        # folded into the moment updates and a factor of 1 costs nothing; elsewhere it stays a
        # device tensor (no host sync, as apex).
        scale = 1.0
        if _clip_on_host(clip):
            scale = 1.0 / float(clip)
        else:
            torch._foreach_div_(g32, clip.to(params[0].device))
        l2_decay = not self.adam_w_mode and wd != 0
        if l2_decay:
            if scale != 1.0:
                torch._foreach_mul_(g32, scale)
                scale = 1.0
            torch._foreach_add_(g32, p32, alpha=wd)
        # m = b1*m + b3*g (b3 = 1-b1 with grad averaging, else 1); v = b2*v + (1-b2)*g^2
        b3 = (1 - beta1) if group["grad_averaging"] else 1.0
        if group["grad_averaging"] and scale == 1.0:
            torch._foreach_lerp_(exp_avgs, g32, 1 - beta1)
        else:
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, g32, alpha=b3 * scale)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, g32, g32, value=(1 - beta2) * scale * scale)
        # u = (m/bc1) / (sqrt(v/bc2) + eps) [+ wd*p]
        #   = (sqrt(bc2)/bc1) * m / (sqrt(v) + eps*sqrt(bc2)) [+ wd*p], written into g's storage.
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, eps * math.sqrt(bc2))
        torch._foreach_zero_(g32)
        if self.adam_w_mode and wd != 0:
            torch._foreach_add_(g32, p32, alpha=wd)
        torch._foreach_addcdiv_(g32, exp_avgs, denom, value=math.sqrt(bc2) / bc1)
        del denom
        update = g32
        if self.use_nvlamb or wd != 0:
            w_norm = self.per_tensor_norms(p_whole)
            u_norm = self.per_tensor_norms(u_whole)
            ratio = torch.where((w_norm != 0) & (u_norm != 0), w_norm / u_norm, torch.ones_like(w_norm)) * lr
            torch._foreach_addcmul_(p32, update, list(ratio.unbind()), value=-1.0)
        else:
            torch._foreach_add_(p32, update, alpha=-lr)
        if not is_fp32:
            torch._foreach_copy_(params, p32)
            torch._foreach_copy_(grads, update)
