# trace(): model + one example batch -> ModelGraph, under FakeTensorMode (no real memory, no real compute).
"""Tracing a model without running it.

The model's parameters and buffers are swapped (``torch.func.functional_call``)
for fake tensors created under ``FakeTensorMode``, so models on the meta
device, on CPU or on CUDA all trace the same way and nothing real is
allocated. One forward is run per precision ("mixed": parameters and float
inputs in bf16 as FSDP2's MixedPrecisionPolicy runs them; "full": the
model's own dtypes; "autocast_cpu" / "autocast_cuda": bf16 autocast over the
model's own parameters as the runtime runs mixed precision without FSDP, with
CUDA's op policy emulated on CPU tensors for the latter,
:func:`moreh_ap.graph.autocast_rules.cuda_autocast_rules`). During it:

* FLOPs are counted with PyTorch's own formulas (``torch.utils.flop_counter``);
* bytes saved for backward are collected with ``saved_tensors_hooks``
  (parameters and their views excluded: they are counted as parameters);
  the saved casts of parameters (autocast's bf16 weight copies) are also
  counted apart (``saved_cast_bytes``): one per parameter, whatever the batch;
* ``F.scaled_dot_product_attention`` is replaced by a stand-in that costs
  the flash / memory-efficient kernel the runtime uses: it saves q, k, v, the
  output and the fp32 log-sum-exp, never B·H·T² probabilities, and adds the
  kernel's FLOPs (4·B·H·Tq·Tk·D, halved when ``is_causal``)
  (:mod:`moreh_ap.graph.trace_kernels`);
* the blocks are the model family's (``moreh_ap.models.find_adapter``), the
  same modules the runtime splits and wraps;
* only the first of identical blocks runs: the others return its output and
  take its numbers (a fake forward of a whole 13B model costs ~1 s).

Backward FLOPs are taken as 2x forward (matmul rule) by the planner.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry

from moreh_ap.graph.model_graph import PRECISIONS, ModelGraph, NodeInfo, TiedParam
from moreh_ap.graph.op_census import OpCensus
from moreh_ap.graph.sequence_saved import SequenceSaved
from moreh_ap.graph.trace_kernels import autocast_for, patched_sdpa
from moreh_ap.models import block_signature, find_adapter

__all__ = ["trace"]


class _Recorder:
    """Per-node counters filled while the fake forward runs."""

    def __init__(self, param_storages: set[int]) -> None:
        self.current = "embedding"
        self.flops: dict[str, int] = {}
        self.saved: dict[str, int] = {}
        self.saved_casts: dict[str, int] = {}  # of ``saved``: casts of parameters (batch-independent)
        self.cast_storages: set[int] = set()  # storages made by casting a parameter (autocast's cast cache)
        self.sequence_saved: dict[str, int] = {}  # of ``saved``: on the residual stream (SequenceSaved)
        self.peak: dict[str, int] = {}
        self.seen: set[int] = set()
        self.out_bytes: dict[str, int] = {}
        self.pre_out = 0
        self.param_storages = param_storages
        self.census = OpCensus()  # GEMM shapes and memory-bound bytes per node, for the time model

    def add_flops(self, n: int) -> None:
        self.flops[self.current] = self.flops.get(self.current, 0) + int(n)

    def note_tensor(self, t: torch.Tensor) -> None:
        nb = t.numel() * t.element_size()
        if nb > self.peak.get(self.current, 0):
            self.peak[self.current] = nb

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
        except Exception:  # a tensor without storage (e.g. a subclass): count its own bytes
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in self.seen and key not in self.param_storages:
            self.seen.add(key)
            self.saved[self.current] = self.saved.get(self.current, 0) + int(nbytes)
            if key in self.cast_storages:
                self.saved_casts[self.current] = self.saved_casts.get(self.current, 0) + int(nbytes)
        return t

    def note_cast(self, src: Any, out: Any) -> None:
        """``out = src.to(dtype)``: remember ``out``'s storage when ``src`` is a parameter."""
        try:
            if src.untyped_storage()._cdata in self.param_storages:
                self.cast_storages.add(out.untyped_storage()._cdata)
        except Exception:  # a tensor without storage: not a parameter
            pass


class _CountMode(TorchDispatchMode):
    """Counts FLOPs with torch's formulas and notes the largest tensor each node creates."""

    def __init__(self, rec: _Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.rec.add_flops(formula(*args, **kwargs, out_val=out))
        if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor) and args:
            self.rec.note_cast(args[0], out)
            if out.untyped_storage()._cdata in self.rec.cast_storages:
                return out  # a weight copy: batch-independent, not a working-set tensor
        if isinstance(out, torch.Tensor):
            self.rec.note_tensor(out)
        self.rec.census.note(self.rec.current, func, args, kwargs, out)
        return out


def _float_bytes(obj: Any) -> int:
    leaves, _ = tree_flatten(obj)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point())


def _hidden_input(args: tuple, kwargs: dict) -> Any:
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
    return kwargs.get("hidden_states", kwargs.get("x"))


def _first_batch_dim(args: tuple, kwargs: dict) -> int:
    leaves, _ = tree_flatten((args, kwargs))
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return 1


def _fake_inputs(obj: Any, *, cast: torch.dtype | None) -> Any:
    """Fake CPU tensors with the shapes/dtypes of ``obj``'s tensors (must run under the fake mode)."""

    def conv(t):
        if not isinstance(t, torch.Tensor):
            return t
        dtype = cast if (cast is not None and t.is_floating_point()) else t.dtype
        return torch.empty(tuple(t.shape), dtype=dtype, device="cpu")

    return tree_map(conv, obj)


class _Tracer:
    """Holds the hooks and per-run state for one :func:`trace` call."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapter = find_adapter(model)  # the blocks the runtime wraps and splits: the planner costs the same
        self.block_fqns = self.adapter.block_fqns()
        self.blocks = [block for _, block in self.adapter.blocks()]
        self.container = self.adapter.container_path if self.blocks else None
        self.block_names = [f"block.{i}" for i in range(len(self.blocks))]
        sigs = [block_signature(b) for b in self.blocks]
        self.rep_of: list[int] = []  # index of the first identical block
        first: dict[tuple, int] = {}
        for i, s in enumerate(sigs):
            self.rep_of.append(first.setdefault(s, i))
        self.rep_out: dict[int, Any] = {}
        self.rec: _Recorder | None = None
        self.block_started = False
        self.owner_node: dict[str, str] = {}  # non-block module FQN -> "embedding" / "head"
        self.out_bytes: dict[str, int] = {}
        self.pre_out = 0
        self.sequence = SequenceSaved(lambda: (self.rec.saved, self.rec.current))

    # ---------------------------------------------------------------- hooks
    def install(self) -> list:
        handles = []
        block_set = set(self.block_fqns)
        for fqn, mod in self.model.named_modules():
            if fqn in block_set or any(fqn.startswith(b + ".") for b in block_set):
                continue
            if next(mod.parameters(recurse=False), None) is not None:
                handles.append(mod.register_forward_pre_hook(self._owner_hook(fqn)))
        for i, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(self._block_pre(i), with_kwargs=True))
            handles.append(block.register_forward_hook(self._block_post(i)))
            handles += self.sequence.install(block)  # what sequence parallelism splits
            if self.rep_of[i] != i:
                rep = self.rep_of[i]
                block.forward = lambda *a, _rep=rep, **k: self.rep_out[_rep]  # identical: reuse the output
        return handles

    def uninstall(self, handles: list) -> None:
        for h in handles:
            h.remove()
        for i, block in enumerate(self.blocks):
            if self.rep_of[i] != i:
                block.__dict__.pop("forward", None)

    def _owner_hook(self, fqn: str):
        def hook(mod, args):
            self.owner_node.setdefault(fqn, "head" if self.block_started else "embedding")

        return hook

    def _block_pre(self, i: int):
        def hook(mod, args, kwargs):
            hidden = _hidden_input(args, kwargs)
            if i == 0:
                self.pre_out = _float_bytes(hidden)
            self.sequence.block_numel = hidden.numel() if isinstance(hidden, torch.Tensor) else 0
            self.block_started = True
            self.rec.current = self.block_names[i]

        return hook

    def _block_post(self, i: int):
        def hook(mod, args, output):
            if self.rep_of[i] == i:
                self.rep_out[i] = output
            self.out_bytes[self.block_names[i]] = _float_bytes(output)
            self.rec.current = "head"

        return hook

    # ------------------------------------------------------------------ run
    def run(self, args: tuple, kwargs: dict, *, cast: torch.dtype | None,
            autocast: str | None = None) -> tuple[_Recorder, int]:
        """One fake forward; returns the recorder and the bytes of the model's floating outputs.

        ``cast``: dtype the float parameters and inputs are cast to (None: their own). ``autocast``:
        "cpu" or "cuda" runs the forward under bf16 autocast with that device type's op policy.
        """
        self.block_started = False
        self.rep_out.clear()
        self.out_bytes = {}
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with fake:
            params = {}
            for name, p in self.model.named_parameters():
                dtype = cast if (cast is not None and p.is_floating_point()) else p.dtype
                params[name] = torch.empty(
                    tuple(p.shape), dtype=dtype, device="cpu", requires_grad=p.requires_grad and dtype.is_floating_point
                )
            buffers = {n: torch.empty(tuple(b.shape), dtype=b.dtype, device="cpu") for n, b in self.model.named_buffers()}
            fargs = _fake_inputs(args, cast=cast)
            fkwargs = _fake_inputs(kwargs, cast=cast)
        storages = {t.untyped_storage()._cdata for t in params.values()}
        rec = _Recorder(storages)
        self.rec = rec
        self.sequence.counted = {}
        hooks = torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t)
        with fake, torch.enable_grad(), _CountMode(rec), patched_sdpa(rec), hooks, autocast_for(autocast):
            out = torch.func.functional_call(self.model, (params, buffers), fargs, fkwargs, strict=False)
        rec.out_bytes, rec.pre_out = dict(self.out_bytes), self.pre_out
        rec.sequence_saved = dict(self.sequence.counted)
        return rec, _float_bytes(out)


def _param_nodes(tracer: _Tracer) -> dict[str, str]:
    """Parameter name (every alias) -> node name."""
    out: dict[str, str] = {}
    for name, _ in tracer.model.named_parameters(remove_duplicate=False):
        node = None
        for i, b in enumerate(tracer.block_fqns):
            if b == "" or name.startswith(b + "."):
                node = tracer.block_names[i]
                break
        if node is None:
            owner = name.rpartition(".")[0]
            node = tracer.owner_node.get(owner, "embedding")
        out[name] = node
    return out


def _build_nodes(tracer: _Tracer, runs: dict[str, tuple[_Recorder, int]],
                 census: dict[str, OpCensus]) -> tuple[list[NodeInfo], list[TiedParam]]:
    names = ["embedding", *tracer.block_names, "head"]
    nodes = {n: NodeInfo(name=n, kind="block", traced=True) for n in names}
    nodes["embedding"].kind, nodes["head"].kind = "pre", "post"
    for i, n in enumerate(tracer.block_names):
        nodes[n].index = i
        nodes[n].fqns = (tracer.block_fqns[i],)
    pnode = _param_nodes(tracer)
    for kind in ("embedding", "head"):
        nodes[kind].fqns = tuple(sorted({k.rpartition(".")[0] for k, v in pnode.items() if v == kind}))
    # parameters: each alias counted in its node, the tied list records the sharing
    aliases: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in tracer.model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
        params[id(p)] = p
    tied: list[TiedParam] = []
    for pid, names_ in aliases.items():
        p = params[pid]
        holders = sorted({pnode[a] for a in names_}, key=names.index)
        for h in holders:
            info = nodes[h]
            info.num_params += p.numel()
            info.trainable_params += p.numel() if p.requires_grad else 0
            info.param_bytes += p.numel() * p.element_size()
            info.largest_param = max(info.largest_param, p.numel())
        if len(holders) > 1:
            tied.append(TiedParam(fqns=tuple(names_), numel=p.numel(), nodes=tuple(holders), trainable=p.requires_grad))
    for prec, (rec, model_out) in runs.items():
        for n in names:
            src = n
            if n.startswith("block."):
                i = int(n.split(".")[1])
                src = tracer.block_names[tracer.rep_of[i]]
                nodes[n].traced = tracer.rep_of[i] == i
            nodes[n].fwd_flops = rec.flops.get(src, 0)
            nodes[n].saved_bytes[prec] = rec.saved.get(src, 0)
            nodes[n].saved_cast_bytes[prec] = rec.saved_casts.get(src, 0)
            nodes[n].norm_saved_bytes[prec] = rec.sequence_saved.get(src, 0)
            nodes[n].peak_fwd_bytes[prec] = rec.peak.get(src, 0)
            nodes[n].gemms[prec] = census[prec].node_gemms(src)
            nodes[n].moved_bytes[prec] = census[prec].moved.get(src, 0)
            nodes[n].attention[prec] = census[prec].node_attention(src)
        for n in tracer.block_names:
            nodes[n].out_bytes[prec] = rec.out_bytes.get(n, 0)
        nodes["embedding"].out_bytes[prec] = rec.pre_out
        nodes["head"].out_bytes[prec] = model_out
    return [nodes[n] for n in names], tied


# precision -> (dtype parameters and float inputs are cast to, autocast device type whose op policy applies)
_RUNS = {"mixed": (torch.bfloat16, None), "full": (None, None), "autocast_cpu": (None, "cpu"),
         "autocast_cuda": (None, "cuda")}


def trace(
    model: nn.Module,
    args: Any = (),
    kwargs: dict[str, Any] | None = None,
    *,
    precisions: tuple[str, ...] = PRECISIONS,
) -> ModelGraph:
    """Trace ``model`` on one example batch into a :class:`ModelGraph`, with no real memory or compute.

    Args:
        model: any ``nn.Module`` (on meta, CPU or CUDA; it is not modified).
        args: positional inputs of one GLOBAL batch (real, fake or meta tensors;
            only shapes and dtypes are used). A single tensor is accepted.
        kwargs: keyword inputs (e.g. ``labels=`` for a Hugging Face model).
        precisions: which of "mixed" (bf16 parameters and float inputs), "full"
            (the model's own dtypes), "autocast_cpu" and "autocast_cuda" (bf16 autocast
            over the model's own parameters with that device's op policy) to trace
            activations for.

    Returns:
        The graph: embedding node, one node per repeated block, head node.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``kwargs`` not a dict.
        ValueError: an unknown precision.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace(model=...) expects a torch.nn.Module, got {type(model).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"trace(kwargs=...) expects a dict or None, got {type(kwargs).__name__}")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise ValueError(f"trace(precisions={precisions!r}) is not valid: expected a non-empty subset of {PRECISIONS}")
    t0 = time.perf_counter()
    args = args if isinstance(args, tuple) else (args,)
    kwargs = dict(kwargs or {})
    tracer = _Tracer(model)
    handles = tracer.install()
    try:
        runs = {prec: tracer.run(args, kwargs, cast=_RUNS[prec][0], autocast=_RUNS[prec][1]) for prec in precisions}
        census = {prec: rec.census for prec, (rec, _) in runs.items()}
        if "mixed" in precisions:  # the time model's op census of mixed precision: bf16 autocast over the weights
            cuda_run = runs.get("autocast_cuda") or tracer.run(args, kwargs, cast=None, autocast="cuda")
            census["mixed"] = cuda_run[0].census
    finally:
        tracer.uninstall(handles)
    nodes, tied = _build_nodes(tracer, runs, census)
    float_sizes = [p.element_size() for p in model.parameters() if p.is_floating_point()]
    return ModelGraph(
        nodes,
        block_container=tracer.container,
        batch_size=_first_batch_dim(args, kwargs),
        tied=tied,
        param_dtype_bytes=max(set(float_sizes), key=float_sizes.count) if float_sizes else 4,
        trace_ms=(time.perf_counter() - t0) * 1e3,
        model_name=type(model).__name__,
        adapter_name=tracer.adapter.name,
        supports_pipeline=tracer.adapter.supports_pipeline,
    )
